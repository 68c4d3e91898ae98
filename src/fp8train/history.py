"""Delayed scaling state: a window of past amax values.

Delayed scaling quantises step t with a scale derived from amaxes seen *before* step t
(the window's max or its most recent entry), so the cast needs no reduction over the
tensor it is casting. The current amax is recorded afterwards. A NaN or inf amax is
never recorded: ``record`` returns False and the window is left untouched, so one bad
batch cannot poison the scale of every later step.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

__all__ = ["AmaxHistory"]

_STATE_VERSION = 1


class AmaxHistory:
    """Ring buffer of the last ``length`` amax values of one operand.

    ``algo="max"`` reduces the window with max (robust to a transient dip);
    ``"most_recent"`` uses the last value (reacts fastest, no protection from spikes).
    Amax values may be scalars (per-tensor) or any fixed shape (one window per element).
    """

    def __init__(self, length: int = 16, algo: Literal["max", "most_recent"] = "max") -> None:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(
                f"amax history length must be an int >= 1, got {length!r}; pass the number "
                "of steps the window keeps, e.g. AmaxHistory(16)"
            )
        if algo not in ("max", "most_recent"):
            raise ValueError(f"amax history algo must be 'max' or 'most_recent', got {algo!r}")
        self.length = length
        self.algo = algo
        self.window: torch.Tensor | None = None  # (length, *amax_shape), fp32
        self.count = 0  # amaxes recorded so far (saturates at nothing; used for ring index)

    def __len__(self) -> int:
        return min(self.count, self.length)

    @property
    def empty(self) -> bool:
        return self.count == 0

    def reduced(self) -> torch.Tensor:
        """The window's amax per the algo. Raises if nothing was recorded yet."""
        if self.window is None or self.count == 0:
            raise RuntimeError("amax history is empty; record an amax first")
        if self.algo == "most_recent":
            # A copy: a view into the ring would change under the next record().
            return self.window[(self.count - 1) % self.length].clone()
        return self.window[: len(self)].amax(dim=0)

    def to_reduce(self) -> torch.Tensor:
        """A ``(n, *amax_shape)`` tensor whose max over dim 0 is :meth:`reduced`, with
        ``n`` fixed for this history, so that a compiled kernel can take the reduction
        into its own call and compile once: the whole window for ``"max"`` (slots not
        yet recorded hold copies of the first amax, see :meth:`record`), the newest row
        for ``"most_recent"`` (a view: read it before the next ``record``). Raises if
        nothing was recorded yet."""
        if self.window is None or self.count == 0:
            raise RuntimeError("amax history is empty; record an amax first")
        if self.algo == "most_recent":
            newest = (self.count - 1) % self.length
            return self.window[newest : newest + 1]
        return self.window

    def record(self, amax: torch.Tensor) -> bool:
        """Append ``amax`` if every entry is finite; return whether it was recorded."""
        amax = amax.detach().float()
        if not bool(torch.isfinite(amax).all()):
            return False
        if self.window is None:
            # Every slot starts as this first amax, so the max over the whole window is
            # the max over the recorded amaxes from the first record on (to_reduce).
            self.window = amax.expand(self.length, *amax.shape).clone()
            self.count = 1
            return True
        if self.window.shape[1:] != amax.shape:
            raise ValueError(
                f"amax shape changed from {tuple(self.window.shape[1:])} to {tuple(amax.shape)}"
            )
        self.window[self.count % self.length] = amax
        self.count += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "length": self.length,
            "algo": self.algo,
            "count": self.count,
            "window": None if self.window is None else self.window.clone(),
        }

    def check_state(
        self,
        state: object,
        *,
        amax_shape: tuple[int, ...] | None = None,
        where: str = "amax history",
    ) -> None:
        """Raise ``TypeError``/``ValueError`` (naming ``where`` and the field) unless
        ``state`` is a :meth:`state_dict` this history can load: same version, length and
        algo; ``count`` an int >= 0; ``window`` None exactly when ``count`` is 0, else an
        fp32 tensor of shape ``(length, *amax_shape)`` (``amax_shape``: given, else this
        history's own once it has recorded, else any) of finite amaxes >= 0. Changes
        nothing."""
        fix = "load the state this history's state_dict() saved, unmodified"
        if not isinstance(state, dict):
            raise TypeError(
                f"{where}: expected the dict state_dict() returns, got {type(state).__name__}; "
                f"{fix}"
            )
        expected_keys = {"version", "length", "algo", "count", "window"}
        if set(state) != expected_keys:
            raise ValueError(
                f"{where}: expected keys {sorted(expected_keys)}, got {sorted(map(str, state))}; "
                f"{fix}"
            )
        if state["version"] != _STATE_VERSION:
            raise ValueError(
                f"{where}: state version {state['version']!r} is not supported "
                f"(expected {_STATE_VERSION}); save it again with this fp8train"
            )
        if state["length"] != self.length or state["algo"] != self.algo:
            raise ValueError(
                f"{where}: config mismatch: checkpoint has length={state['length']!r}, "
                f"algo={state['algo']!r}; this module has length={self.length}, "
                f"algo={self.algo!r}; build the model with the checkpoint's recipe"
            )
        count = state["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(
                f"{where}: 'count' must be an int >= 0 (amaxes recorded so far), got "
                f"{count!r}; {fix}"
            )
        window = state["window"]
        if window is None or count == 0:
            if window is not None or count != 0:
                raise ValueError(
                    f"{where}: 'window' must be None exactly when 'count' is 0, got count="
                    f"{count} and window {'None' if window is None else 'a tensor'}; {fix}"
                )
            return
        if not isinstance(window, torch.Tensor) or window.dtype != torch.float32:
            got = window.dtype if isinstance(window, torch.Tensor) else type(window).__name__
            raise TypeError(f"{where}: 'window' must be an fp32 tensor, got {got}; {fix}")
        if amax_shape is None and self.window is not None:
            amax_shape = tuple(self.window.shape[1:])
        if (
            window.dim() == 0
            or window.shape[0] != self.length
            or (amax_shape is not None and tuple(window.shape[1:]) != tuple(amax_shape))
        ):
            want = (
                f"({self.length}, *amax_shape)"
                if amax_shape is None
                else str((self.length, *amax_shape))
            )
            raise ValueError(
                f"{where}: 'window' must have shape {want} (length, then the amax's shape), "
                f"got {tuple(window.shape)}; the checkpoint comes from another model or "
                f"recipe: {fix}"
            )
        bad = ~torch.isfinite(window) | (window < 0)
        if bool(bad.any()):
            raise ValueError(
                f"{where}: 'window' holds {int(bad.sum())} NaN, inf or negative amaxes of "
                f"{window.numel()}; amaxes are finite and >= 0 (a NaN one would make the "
                f"scale NaN or inf); {fix}"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; :meth:`check_state` first (nothing changes
        if it raises)."""
        self.check_state(state)
        self.count = int(state["count"])
        window = state["window"]
        self.window = None if window is None else window.clone().float()
        if self.window is not None and 0 < self.count < self.length:
            # Checkpoints of earlier versions kept zeros in the slots not yet recorded;
            # the window's max must be the recorded amaxes' max (to_reduce).
            self.window[self.count :] = self.window[0]

    def __repr__(self) -> str:
        return f"AmaxHistory(length={self.length}, algo={self.algo!r}, recorded={self.count})"
