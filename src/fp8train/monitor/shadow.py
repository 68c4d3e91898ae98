"""The BF16 shadow check: how far each FP8 layer's output is from a bf16 layer's.

On the steps it runs, a forward hook on each layer recomputes the output as a bf16
layer would (``F.linear`` of the bf16-rounded input, weight and bias, fp32
accumulation, one bf16 rounding) and accumulates
``bf16_rel_err = ||y_fp8 - y_bf16|| / ||y_bf16||`` (float64), recorded as a layer
record with role ``"output"``. Forward passes under ``torch.no_grad()`` (evaluation)
are left out. It costs one extra high-precision GEMM per layer forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fp8train.matmul import gemm_dtype
from fp8train.nn import Fp8Linear

__all__ = ["Bf16Shadow"]


class Bf16Shadow:
    """Forward hooks on ``layers`` comparing each output with the bf16 layer's."""

    def __init__(self, layers: Sequence[tuple[str, Fp8Linear]]) -> None:
        self._layers = list(layers)
        self._order = {name: i for i, (name, _) in enumerate(self._layers)}
        self._sums: dict[str, list[float]] = {}  # layer -> [sum err^2, sum ref^2]
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        """Hook every layer's forward."""
        for name, layer in self._layers:
            self._hooks.append(layer.register_forward_hook(self._hook(name)))

    def uninstall(self) -> None:
        """Remove every hook."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def clear(self) -> None:
        """Forget this step's sums (at the end of every step)."""
        self._sums = {}

    def _hook(self, name: str) -> Any:
        def hook(module: Fp8Linear, args: Any, output: torch.Tensor) -> None:
            if not torch.is_grad_enabled():  # evaluation pass: not a training step
                return
            x = args[0]
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                w, b = module.weight, module.bias
                # The bf16 layer: operands rounded to bf16, fp32 accumulation, one bf16
                # rounding; in fp32 where bf16 GEMMs are not native (much faster there,
                # the same arithmetic up to summation order).
                work = gemm_dtype(torch.bfloat16, True, x.device.type)
                ref = F.linear(
                    x.detach().to(torch.bfloat16).to(work),
                    w.detach().to(torch.bfloat16).to(work),
                    None if b is None else b.detach().to(torch.bfloat16).to(work),
                ).to(torch.bfloat16)
                ref64 = ref.reshape(-1).double()
                err = output.detach().reshape(-1).double() - ref64
                acc = self._sums.setdefault(name, [0.0, 0.0])
                acc[0] += float(torch.dot(err, err))
                acc[1] += float(torch.dot(ref64, ref64))

        return hook

    def records(self, s: int) -> list[dict[str, Any]]:
        """Step ``s``'s ``"output"`` layer records, by layer order."""
        records = []
        for layer in sorted(self._sums, key=lambda n: self._order.get(n, 0)):
            err2, ref2 = self._sums[layer]
            if not (math.isfinite(err2) and math.isfinite(ref2)):
                rel = math.nan  # NaN/inf in the layer's input or output
            else:
                rel = math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
            records.append(
                {"step": s, "kind": "layer", "layer": layer, "role": "output", "bf16_rel_err": rel}
            )
        return records
