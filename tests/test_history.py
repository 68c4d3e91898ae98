"""AmaxHistory: the delayed-scaling window, its reductions, its guard against non-finite
amaxes, and its checkpoint round trip."""

from __future__ import annotations

import math
from typing import Any, Literal

import pytest
import torch

from fp8train import AmaxHistory

Algo = Literal["max", "most_recent"]


def _t(v: Any) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _window(h: AmaxHistory) -> torch.Tensor:
    assert h.window is not None
    return torch.as_tensor(h.window)


# Five amaxes recorded into a window of length 3: after the 4th and 5th the ring wraps
# and overwrites the 1st and 2nd.
VALUES = [5.0, 1.0, 4.0, 2.0, 3.0]
# After each record: max of the last min(n, 3) values, and the most recent value.
EXPECTED_MAX = [5.0, 5.0, 5.0, 4.0, 4.0]
EXPECTED_RECENT = VALUES


@pytest.mark.parametrize(
    "algo, expected", [("max", EXPECTED_MAX), ("most_recent", EXPECTED_RECENT)]
)
def test_window_reduction_with_wraparound(algo: Algo, expected: list[float]) -> None:
    h = AmaxHistory(length=3, algo=algo)
    for n, (v, want) in enumerate(zip(VALUES, expected, strict=False), start=1):
        assert h.record(_t(v)) is True
        assert h.reduced().item() == want, f"after {n} records"
        assert len(h) == min(n, 3) and h.count == n and not h.empty


def test_reduced_on_empty_raises() -> None:
    h = AmaxHistory(length=4)
    assert h.empty and len(h) == 0
    with pytest.raises(RuntimeError, match="empty"):
        h.reduced()


@pytest.mark.parametrize("algo", ["max", "most_recent"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_amax_is_not_recorded(algo: Algo, bad: float) -> None:
    h = AmaxHistory(length=3, algo=algo)
    for v in VALUES[:4]:  # wrapped once, so the next slot holds a live value
        h.record(_t(v))
    window, count, reduced = _window(h).clone(), h.count, h.reduced().clone()
    assert h.record(_t(bad)) is False
    assert h.record(_t([1.0, bad])[1:].reshape(())) is False
    assert h.count == count
    assert torch.equal(_window(h), window)
    assert torch.equal(h.reduced(), reduced)


def test_non_finite_first_amax_leaves_history_empty() -> None:
    h = AmaxHistory(length=2)
    assert h.record(_t(math.nan)) is False
    assert h.empty and h.window is None
    with pytest.raises(RuntimeError):
        h.reduced()


def test_partly_non_finite_per_element_amax_is_not_recorded() -> None:
    h = AmaxHistory(length=2)
    h.record(_t([[1.0], [2.0]]))
    assert h.record(_t([[3.0], [math.inf]])) is False
    assert h.count == 1 and h.reduced().tolist() == [[1.0], [2.0]]


@pytest.mark.parametrize("shape", [(4, 1), (1, 5), (2, 3)], ids=str)
def test_per_element_amax(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    seq = [torch.rand(shape, generator=gen) * 10 for _ in range(5)]
    hmax = AmaxHistory(length=3, algo="max")
    hrec = AmaxHistory(length=3, algo="most_recent")
    for n, a in enumerate(seq, start=1):
        hmax.record(a)
        hrec.record(a)
        window = torch.stack(seq[max(0, n - 3) : n])  # the live entries
        assert hmax.reduced().shape == shape
        assert torch.equal(hmax.reduced(), window.amax(dim=0))  # elementwise, not global
        assert torch.equal(hrec.reduced(), a)


@pytest.mark.parametrize("algo", ["max", "most_recent"])
@pytest.mark.parametrize("shape", [(), (4, 1)], ids=str)
def test_to_reduce_has_a_fixed_shape_and_reduces_to_reduced(
    algo: Algo, shape: tuple[int, ...]
) -> None:
    """What a kernel reduces in place of reduced(): the same values after every record
    (the ring filling up and wrapping), in one shape throughout, so a compiled kernel
    taking it compiles once. The values are negative (no real amax is): a window whose
    unrecorded slots held zeros would then reduce to 0 before the ring is full."""
    gen = torch.Generator().manual_seed(0)
    seq = [torch.full(shape, -50.0)] + [-torch.rand(shape, generator=gen) * n for n in range(1, 8)]
    h = AmaxHistory(length=4, algo=algo)
    shapes = set()
    for n, a in enumerate(seq, start=1):
        h.record(a)
        window = h.to_reduce()
        shapes.add(tuple(window.shape))
        assert torch.equal(window.amax(dim=0), h.reduced()), f"after {n} records"
    assert len(shapes) == 1


@pytest.mark.parametrize("count", [1, 2, 3])
def test_old_checkpoint_with_zeros_in_unrecorded_slots_reduces_the_same(count: int) -> None:
    """Checkpoints saved before to_reduce kept zeros in the slots not yet recorded; once
    loaded, the slots not yet recorded hold the first amax again, so the whole window's
    max is the recorded amaxes' max."""
    h = AmaxHistory(length=4)
    window = torch.zeros(4, 2)
    window[:count] = torch.arange(1.0, 2 * count + 1).reshape(count, 2)
    h.load_state_dict({"version": 1, "length": 4, "algo": "max", "count": count, "window": window})
    assert torch.equal(h.to_reduce().amax(dim=0), h.reduced())
    assert torch.equal(h.reduced(), window[:count].amax(dim=0))
    assert torch.equal(_window(h)[count:], window[0].expand(4 - count, 2))


def test_amax_is_stored_as_detached_fp32() -> None:
    h = AmaxHistory(length=2)
    a = torch.tensor(3.0, dtype=torch.bfloat16, requires_grad=True)
    h.record(a * 1)
    assert h.reduced().dtype == torch.float32 and not h.reduced().requires_grad


def test_shape_change_raises() -> None:
    h = AmaxHistory(length=2)
    h.record(_t([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        h.record(_t([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="shape"):
        h.record(_t(1.0))
    assert h.count == 1


@pytest.mark.parametrize(
    "algo",
    [
        "max",
        "most_recent",
    ],
)
@pytest.mark.parametrize("length", [1, 3])
def test_reduced_is_a_snapshot(algo: Algo, length: int) -> None:
    h = AmaxHistory(length=length, algo=algo)
    h.record(_t(8.0))
    prev = h.reduced()  # the delayed-scaling amax for this step
    for _ in range(length):  # enough records to overwrite every slot
        h.record(_t(1.0))
    assert prev.item() == 8.0


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("algo", ["max", "most_recent"])
@pytest.mark.parametrize("split", [0, 2, 4, 7])
def test_state_dict_round_trip_continues_identically(algo: Algo, split: int) -> None:
    gen = torch.Generator().manual_seed(1)
    seq = [torch.rand(3, generator=gen) * 100 for _ in range(10)]
    uninterrupted = AmaxHistory(length=3, algo=algo)
    first = AmaxHistory(length=3, algo=algo)
    for a in seq[:split]:
        first.record(a)
    state = first.state_dict()
    first.record(_t([1e6, 1e6, 1e6]))  # must not leak into the saved state
    resumed = AmaxHistory(length=3, algo=algo)
    resumed.load_state_dict(state)
    for a in seq[:split]:
        uninterrupted.record(a)
    assert resumed.count == uninterrupted.count == split
    for a in seq[split:]:
        assert resumed.record(a) == uninterrupted.record(a)
        assert torch.equal(resumed.reduced(), uninterrupted.reduced())
        assert torch.equal(_window(resumed), _window(uninterrupted))
    assert torch.equal(resumed.state_dict()["window"], uninterrupted.state_dict()["window"])


def test_state_dict_is_a_copy() -> None:
    h = AmaxHistory(length=2)
    h.record(_t(1.0))
    state = h.state_dict()
    state["window"].fill_(99.0)
    assert h.reduced().item() == 1.0
    h2 = AmaxHistory(length=2)
    h2.load_state_dict(state)
    state["window"].fill_(5.0)
    assert h2.reduced().item() == 99.0


def test_state_dict_of_empty_history_round_trips() -> None:
    state = AmaxHistory(length=2).state_dict()
    h = AmaxHistory(length=2)
    h.record(_t(3.0))
    h.load_state_dict(state)
    assert h.empty and h.window is None


def test_load_rejects_other_version() -> None:
    state = AmaxHistory(length=2).state_dict()
    for version in (0, 2, None):
        bad = dict(state, version=version)
        with pytest.raises(ValueError, match="version"):
            AmaxHistory(length=2).load_state_dict(bad)
    with pytest.raises(ValueError, match="version"):
        AmaxHistory(length=2).load_state_dict({k: v for k, v in state.items() if k != "version"})


@pytest.mark.parametrize("length, algo", [(3, "max"), (2, "most_recent")])
def test_load_rejects_config_mismatch(length: int, algo: Algo) -> None:
    h = AmaxHistory(length=2, algo="max")
    h.record(_t(1.0))
    target = AmaxHistory(length=length, algo=algo)
    with pytest.raises(ValueError, match="mismatch"):
        target.load_state_dict(h.state_dict())
    assert target.empty  # nothing half-loaded


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"length": 0}, "length"),
        ({"length": -3}, "length"),
        ({"algo": "mean"}, "algo"),
        ({"algo": "MAX"}, "algo"),
    ],
)
def test_bad_config_raises(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AmaxHistory(**kwargs)


# ---------------------------------------------------------------------- checked state
def _good_state() -> dict[str, Any]:
    h = AmaxHistory(length=4)
    h.record(_t(2.0))
    h.record(_t(3.0))
    return h.state_dict()


def _bad(**changes: Any) -> dict[str, Any]:
    state = _good_state()
    state.update(changes)
    return state


@pytest.mark.parametrize(
    ("state", "error", "match"),
    [
        (_bad(window=torch.full((4,), math.nan)), ValueError, r"'window' holds 4 NaN"),
        (_bad(window=torch.tensor([1.0, math.inf, 1.0, 1.0])), ValueError, "NaN, inf"),
        (_bad(window=torch.tensor([1.0, -1.0, 1.0, 1.0])), ValueError, "negative"),
        (_bad(count=-1), ValueError, r"'count' must be an int >= 0.*got -1"),
        (_bad(count=2.5), ValueError, r"'count' must be an int"),
        (_bad(count=0), ValueError, r"None exactly when 'count' is 0"),
        (_bad(window=None), ValueError, r"None exactly when 'count' is 0"),
        (_bad(window=torch.ones(3)), ValueError, r"shape \(4,\) .*got \(3,\)"),
        (_bad(window=torch.ones(4, dtype=torch.float64)), TypeError, "fp32 tensor.*float64"),
        (_bad(window=[1.0, 1.0, 1.0, 1.0]), TypeError, "fp32 tensor, got list"),
        ({"version": 1}, ValueError, r"expected keys \['algo', 'count'"),
        (None, TypeError, "expected the dict state_dict.. returns, got NoneType"),
    ],
    ids=[
        "nan",
        "inf",
        "negative",
        "neg-count",
        "float-count",
        "zero-count",
        "no-window",
        "short",
        "fp64",
        "list",
        "keys",
        "none",
    ],
)
def test_bad_state_raises_and_changes_nothing(state: Any, error: type, match: str) -> None:
    """Each used to load (NaN: the scale became inf; wrong shape: failed later in torch)
    or raise KeyError/AttributeError."""
    h = AmaxHistory(length=4)
    h.record(_t(5.0))
    before = _window(h).clone()
    with pytest.raises(error, match=match):
        h.load_state_dict(state)
    assert h.count == 1 and torch.equal(_window(h), before)


def test_check_state_compares_the_amax_shape() -> None:
    h = AmaxHistory(length=4)
    h.check_state(_good_state(), amax_shape=())
    with pytest.raises(ValueError, match=r"layer 'fc' input: 'window' must have shape \(4, 3\)"):
        h.check_state(_good_state(), amax_shape=(3,), where="layer 'fc' input")
    h.record(_t([1.0, 2.0]))  # its own shape is (2,) from now on
    with pytest.raises(ValueError, match=r"shape \(4, 2\).*got \(4,\)"):
        h.load_state_dict(_good_state())


@pytest.mark.parametrize("length", [2.5, 0, True, "16"])
def test_length_must_be_a_positive_int(length: Any) -> None:
    with pytest.raises(ValueError, match=r"length must be an int >= 1, got .*AmaxHistory\(16\)"):
        AmaxHistory(length)
