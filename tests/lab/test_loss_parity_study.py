"""docs/loss_parity/run_study.py: its sizes are valid lab configs, its precisions valid
names, and its table pairs the gaps by seed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

from fp8train.lab.config import check_precision, resolve

STUDY = Path(__file__).resolve().parents[2] / "docs" / "loss_parity" / "run_study.py"


def _study() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_study", STUDY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_results(folder: Path, losses: dict[str, list[float]]) -> None:
    """A results.json whose precisions have these final losses, seed i at index i."""
    runs = {
        p: {"per_seed": [{"seed": s, "final_val_loss": v} for s, v in enumerate(vals)]}
        for p, vals in losses.items()
    }
    (folder / "results.json").write_text(json.dumps({"runs": runs}))


def _table_rows(folder: Path) -> dict[str, list[str]]:
    """The study table's rows by precision, split into cells."""
    return {
        line.split(" | ")[0].removeprefix("| "): line.split(" | ")
        for line in _study().table(folder).splitlines()[2:]
    }


def test_sizes_and_precisions_are_valid() -> None:
    study = _study()
    for precision in study.STUDY_PRECISIONS:
        check_precision(precision)
    d256 = resolve("gpt", "default", study.SIZES["d256"])
    assert (d256.d_model, d256.layers, d256.heads, d256.seq, d256.batch) == (256, 4, 4, 128, 16)
    assert (d256.steps, d256.lr, d256.warmup_steps, d256.corpus_mb) == (400, 2e-3, 20, 8.0)
    assert d256.lr * d256.min_lr_ratio == 2e-4 and not d256.fp8_head
    assert resolve("gpt", "default", study.SIZES["d128"]) == resolve("gpt", "default", {})


def test_table_pairs_gaps_by_seed(tmp_path: Path) -> None:
    losses = {
        "bf16": [2.00, 2.10, 2.20],
        "tensorwise": [2.02, 2.121, 2.20],
        "torchao-tensorwise": [2.00, 2.10, 2.22],
    }
    _write_results(tmp_path, losses)
    rows = _table_rows(tmp_path)
    # tensorwise: +1%, +1%, 0% -> mean +0.67%, SE 0.33%; its own tensorwise gap is blank.
    assert rows["tensorwise"][3:5] == ["+0.67%", "0.33%"]
    assert rows["tensorwise"][6:] == ["", " |"]
    # torchao: 0, 0, +0.91% vs bf16 (SE 0.30%: within 2 SE); vs tensorwise -0.99%,
    # -0.99%, +0.91%.
    assert rows["torchao-tensorwise"][3:6] == ["+0.30%", "0.30%", "yes"]
    assert rows["torchao-tensorwise"][6] == "-0.36%"
    assert rows["bf16"][3] == ""


def test_table_says_when_a_gap_is_beyond_two_standard_errors(tmp_path: Path) -> None:
    # +1.0%, +1.1%, +0.9%: mean +1.0%, SE 0.058%: far beyond 2 SE. One seed: no SE.
    losses = {"bf16": [2.0, 2.0, 2.0], "rowwise": [2.02, 2.022, 2.018], "mxfp8": [2.1]}
    _write_results(tmp_path, losses)
    rows = _table_rows(tmp_path)
    assert rows["rowwise"][3:6] == ["+1.00%", "0.06%", "no"]
    assert rows["mxfp8"][3:6] == ["+5.00%", "-", "-"]


def test_per_seed_table_lists_each_seed_and_the_spread(tmp_path: Path) -> None:
    losses = {"bf16": [2.0, 2.0, 2.0], "tensorwise": [2.02, 1.98, 2.0]}
    _write_results(tmp_path, losses)
    lines = _study().per_seed(tmp_path).splitlines()
    assert lines[0] == "| precision | seed 0 | seed 1 | seed 2 | SD |"
    # +1%, -1%, 0%: standard deviation 1%.
    assert lines[2] == "| tensorwise | +1.00% | -1.00% | +0.00% | 1.00% |"
    assert len(lines) == 3  # bf16 has no gap to itself


def test_numerics_summarises_the_monitor_logs(tmp_path: Path) -> None:
    def record(step: int, layer: str, role: str, sqnr: float, underflow: float) -> str:
        return json.dumps(
            {
                "step": step,
                "kind": "layer",
                "layer": layer,
                "role": role,
                "sqnr_db": sqnr,
                "underflow": underflow,
                "clipped": 0.0,
            }
        )

    (tmp_path / "monitor").mkdir()
    lines = [
        record(0, "a", "input", 30.0, 0.0),
        record(1, "a", "input", 32.0, 0.0),
        record(0, "b", "input", 20.0, 0.01),
        record(1, "b", "input", 22.0, 0.03),
        json.dumps({"step": 1, "kind": "loss", "loss": 2.0}),  # not a layer record
    ]
    (tmp_path / "monitor" / "rowwise-seed0.jsonl").write_text("\n".join(lines))
    (tmp_path / "monitor" / "rowwise-seed1.jsonl").write_text(record(0, "a", "input", 1.0, 1))
    rows = _study().numerics(tmp_path, seed=0).splitlines()[2:]
    # Median of 30, 32, 20, 22 = 26; worst layer b (median 21); mean underflow 0.01.
    assert rows == ["| rowwise | input | 26.0 | b (21.0) | 1.00e-02 | 0.00e+00 |"]
