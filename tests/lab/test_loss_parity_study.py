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
    runs = {
        p: {"per_seed": [{"seed": s, "final_val_loss": v} for s, v in enumerate(vals)]}
        for p, vals in losses.items()
    }
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs}))
    rows = {
        line.split(" | ")[0].removeprefix("| "): line.split(" | ")
        for line in _study().table(tmp_path).splitlines()[2:]
    }
    # tensorwise: +1%, +1%, 0% -> mean +0.67%, SE 0.33%; its own tensorwise gap is blank.
    assert rows["tensorwise"][3:5] == ["+0.67%", "0.33%"]
    assert rows["tensorwise"][5:] == ["", " |"]
    # torchao: 0, 0, +0.91% vs bf16; vs tensorwise -0.99%, -0.99%, +0.91%.
    assert rows["torchao-tensorwise"][3] == "+0.30%"
    assert rows["torchao-tensorwise"][5] == "-0.36%"
    assert rows["bf16"][3] == ""
