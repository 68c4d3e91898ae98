"""The README promises what it shows: its usage example runs as pasted, its test command
is the one CI runs, its links resolve, and it stays short."""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_usage_example_runs_as_pasted_and_trains_in_fp8() -> None:
    import fp8train

    (example,) = _blocks("python")
    out = io.StringIO()
    scope: dict[str, object] = {"__name__": "__readme__"}
    with contextlib.redirect_stdout(out):
        exec(compile(example, "README.md usage", "exec"), scope)
    match = re.fullmatch(r"final loss (\S+)\n", out.getvalue())
    assert match is not None, out.getvalue()
    # The target is unit-variance noise: an untrained model's MSE is about 1; twenty
    # AdamW steps on one batch must bring it well below and keep it finite.
    loss = float(match.group(1))
    assert math.isfinite(loss) and loss < 0.9, loss
    model = scope["model"]
    assert isinstance(model, torch.nn.Module)
    assert sum(isinstance(m, fp8train.Fp8Linear) for m in model.modules()) == 2


def test_ci_runs_the_readme_test_command() -> None:
    setup_commands = _blocks("bash")
    test_command = next(c.strip() for c in setup_commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    install, _, pytest_call = test_command.rpartition(" && ")
    assert install in ci, "the README's install differs from .ci/run's"
    assert ci.rstrip().endswith(pytest_call), ".ci/run must end with the README's pytest"


def test_readme_is_short_and_its_links_resolve() -> None:
    assert len(README.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to missing {target}"
