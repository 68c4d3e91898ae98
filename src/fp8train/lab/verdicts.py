"""How strongly a gap to bf16 is worded: the thresholds, in one place, and the verdicts.

A gap is measured in units of its noise, and the wording grows with that ratio:

* several paired seeds: the unit is the standard error of the mean paired gap;
* one seed: there is no standard error, and the unit is the fp32-vs-bf16 gap of the same
  seed (the noise floor: what a change of arithmetic that should not matter moves).

Words, weakest first: "indistinguishable from", "possibly worse/better than",
"worse/better than", "clearly worse/better than". Nothing here imports torch, so the
report can word its explanation from the same table.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "CLAIM_SE",
    "THRESHOLDS",
    "gap_word",
    "plural",
    "strength",
    "thresholds_text",
    "verdict",
]

# Noise units a gap must exceed for "possibly", plain and "clearly" wording.
# Standard errors: 2 SE is about 95% two-sided for a normal mean, but with a handful of
# seeds the SE is itself a rough estimate (Student's t with 2 degrees of freedom puts 95%
# at 4.3 SE), so a plain claim needs 3 and "clearly" 5.
# Noise floor: a single fp32-vs-bf16 gap is one draw of the noise, not its spread, so a
# gap just beyond it is only possible; three times it is a difference; ten times it is
# one no plausible noise explains.
THRESHOLDS: dict[str, tuple[float, float, float]] = {
    "standard_error": (2.0, 3.0, 5.0),
    "noise_floor": (1.0, 3.0, 10.0),
}
# No difference is claimed within this many standard errors (kept for callers).
CLAIM_SE = THRESHOLDS["standard_error"][0]
_WORDS = ("indistinguishable from", "possibly {} than", "{} than", "clearly {} than")


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``"1 precision"``, ``"3 precisions"`` (``nouns``: an irregular plural)."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def strength(ratio: float, unit: str) -> int:
    """0 (indistinguishable) to 3 (clearly): how many of ``THRESHOLDS[unit]`` the gap's
    size in noise units, ``ratio`` (>= 0), exceeds."""
    return sum(ratio > t for t in THRESHOLDS[unit])


def gap_word(gap: float, ratio: float, unit: str) -> str:
    """``"clearly worse than"``, ``"indistinguishable from"``, ...: the wording of a
    ``gap`` (in %, positive = higher loss than bf16) that is ``ratio`` noise units."""
    return _WORDS[strength(ratio, unit)].format("worse" if gap > 0 else "better")


def thresholds_text() -> str:
    """The wording rule in one sentence, for the report."""
    se, floor = THRESHOLDS["standard_error"], THRESHOLDS["noise_floor"]
    return (
        "Verdicts scale with the evidence: with several seeds, a gap within "
        f"{se[0]:g} standard errors of the mean paired gap is indistinguishable from bf16, "
        f"beyond {se[0]:g} possibly worse or better, beyond {se[1]:g} worse or better, beyond "
        f"{se[2]:g} clearly so; with one seed there is no standard error and the unit is the "
        f"fp32-vs-bf16 gap of that seed (the noise floor), with thresholds {floor[0]:g}x, "
        f"{floor[1]:g}x and {floor[2]:g}x."
    )


def verdict(precision: str, run: dict[str, Any], floor: dict[str, Any] | None, seeds: int) -> str:
    """One line judging ``precision`` against bf16, as strongly as the noise allows."""
    if run["diverged"]:
        return "diverged: the final validation loss is not finite"
    if precision == "bf16":
        return "reference: every gap is measured against this run"
    gap, se = run["val_loss_gap_vs_bf16_pct"], run["val_loss_gap_vs_bf16_se_pct"]
    if gap is None:
        return "no verdict: bf16 was not run, so there is no reference"
    skipped = run["skipped_steps"]
    tail = f"; {plural(skipped, 'step')} skipped by the loss scaler" if skipped else ""
    if seeds >= 2 and se is not None:
        ratio = _ratio(gap, se)
        return (
            f"{gap_word(gap, ratio, 'standard_error')} bf16: validation loss {gap:+.2f}% "
            f"(SE {se:.2f}%, {_num(ratio)} SE over {seeds} paired seeds)" + tail
        )
    # One seed: no standard error. The fp32-vs-bf16 gap of the same seed is the floor.
    if precision == "fp32":
        return (
            f"noise floor: fp32 differs from bf16 by {gap:+.2f}% (one seed, no standard "
            f"error; use --seeds N for one)" + tail
        )
    floor_gap = floor["fp32_vs_bf16_gap_pct"] if floor else None
    if floor_gap is None:
        return (
            f"no verdict: gap {gap:+.2f}% from one seed has no standard error and fp32 was "
            f"not run for a noise floor; use --seeds N or add fp32" + tail
        )
    ratio = _ratio(gap, abs(floor_gap))
    word = gap_word(gap, ratio, "noise_floor")
    confirm = "" if word.startswith("indistinguishable") else "; confirm with --seeds N"
    return (
        f"{word} bf16: gap {gap:+.2f}% is {_num(ratio)}x the fp32-vs-bf16 noise floor "
        f"({abs(floor_gap):.2f}%; one seed, no standard error{confirm})" + tail
    )


def _ratio(gap: float, unit: float) -> float:
    """|gap| in noise units; a zero unit (no noise measured) makes any gap infinite."""
    if unit > 0:
        return abs(gap) / unit
    return math.inf if gap else 0.0


def _num(ratio: float) -> str:
    return "inf" if math.isinf(ratio) else f"{ratio:.1f}"
