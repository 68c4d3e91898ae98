"""A compiled kernel compiled for the first time while the caller has a dispatch mode on
(the lab's memory ledger, a FLOP counter) traces outside that mode: the mode would
otherwise meet the tracing's fake tensors with symbolic sizes, and make_fx failed on an
untracked SymInt (the lab's step-2 memory ledger crashed a run whose kernels compiled
on that step)."""

from __future__ import annotations

import pytest
import torch

from fp8train._kernels.capture import compiled, standalone_compile_available
from fp8train.lab.memory import LiveTensorBytes

pytestmark = pytest.mark.skipif(
    not standalone_compile_available(), reason="needs torch._inductor.standalone_compile"
)


def _scale_and_sum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.abs().amax()
    return x * (448.0 / amax), amax


def test_first_compile_inside_a_memory_counting_mode() -> None:
    kernel = compiled(_scale_and_sum)
    x = torch.randn(48, 40)
    # No FX graph cache: a cache hit skips the part of compilation that failed.
    with torch._inductor.config.patch(fx_graph_cache=False), LiveTensorBytes() as ledger:
        scaled, amax = kernel(x)
        total = scaled.sum()  # the kernel's output reaches the mode here, as an input
    torch.testing.assert_close(scaled, x * (448.0 / x.abs().amax()), rtol=0, atol=0)
    assert amax == x.abs().amax()
    assert total == scaled.sum()
    # The mode counted the real output, and nothing symbolic: its count is a plain int.
    assert isinstance(ledger.peak, int) and ledger.peak >= scaled.nbytes
