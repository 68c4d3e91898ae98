"""The lab's parts on their own: config, data, schedule, saved-bytes meter, verdicts."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path

import pytest
import torch

from fp8train.lab import compare, config, data, train
from fp8train.lab.config import LabConfig, LabError


def test_every_config_field_has_a_comment() -> None:
    # STYLE: every config field comments on its default.
    source = Path(config.__file__).read_text().splitlines()
    body = source[next(i for i, s in enumerate(source) if s.startswith("class LabConfig")) :]
    for field in dataclasses.fields(LabConfig):
        (i,) = [i for i, s in enumerate(body) if s.strip().startswith(f"{field.name}:")]
        assert body[i - 1].strip().startswith("#"), field.name


def test_config_is_frozen_and_validates() -> None:
    cfg = config.resolve("gpt", "default", {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3  # type: ignore[misc]
    assert cfg.precisions == config.PRECISIONS
    with pytest.raises(LabError, match=r"unknown precision 'fp4'.*known: fp32, bf16"):
        config.resolve("gpt", "default", {"precisions": ("fp4",)})
    with pytest.raises(LabError, match="--steps must be >= 1"):
        config.resolve("gpt", "tiny", {"steps": 0})
    assert config.parse_precisions(" BF16, int8 ") == ("bf16", "int8")
    # FP8 activation storage variants exist for FP8 recipes only.
    assert config.resolve("gpt", "tiny", {"precisions": ("mxfp8+fp8act",)}).precisions
    for bad in ("bf16+fp8act", "tensorwise+fp4act"):
        with pytest.raises(
            LabError, match=f"unknown precision '{re.escape(bad)}'.*tensorwise\\+fp8act"
        ):
            config.resolve("gpt", "tiny", {"precisions": (bad,)})
    assert config.recipe_of("rowwise+fp8act") == "rowwise" and config.recipe_of("bf16") is None
    assert config.stores_fp8_activations("int8+fp8act")
    assert not config.stores_fp8_activations("int8")
    assert config.from_dict(dataclasses.asdict(cfg)) == cfg
    with pytest.raises(LabError, match=r"--micro-batches must be >= 1 and divide --batch \(16\)"):
        config.resolve("gpt", "default", {"micro_batches": 3})
    with pytest.raises(LabError, match="--grad-clip must be > 0"):
        config.resolve("gpt", "default", {"grad_clip": 0.0})
    with pytest.raises(LabError, match="--dist must be ddp or fsdp2"):
        config.resolve("gpt", "default", {"dist": "fsdp"})
    with pytest.raises(LabError, match="apply to --dist fsdp2 only"):
        config.resolve("gpt", "default", {"dist": "ddp", "fp8_all_gather": True})
    # --grad-comm: fp32 everywhere (no hook); bf16 and fp8 under DDP only.
    assert config.resolve("gpt", "default", {}).grad_comm == "fp32"
    for comm in config.GRAD_COMMS:
        assert config.resolve("gpt", "default", {"dist": "ddp", "grad_comm": comm}).grad_comm
    with pytest.raises(LabError, match=r"--grad-comm must be one of fp32, bf16, fp8, got 'e4m3'"):
        config.resolve("gpt", "default", {"dist": "ddp", "grad_comm": "e4m3"})
    for dist in (None, "fsdp2"):
        with pytest.raises(LabError, match="--grad-comm fp8 applies to --dist ddp only"):
            config.resolve("gpt", "default", {"dist": dist, "grad_comm": "fp8"})


def test_saved_config_without_newer_fields_still_loads() -> None:
    # A checkpoint or config.json from before dist/micro_batches existed resumes.
    saved = dataclasses.asdict(config.resolve("gpt", "tiny", {}))
    for name in ("micro_batches", "dist", "fp8_all_gather", "grad_comm"):
        del saved[name]
    assert config.from_dict(saved) == config.resolve("gpt", "tiny", {})


def test_fp8_all_gather_by_default_where_the_recipe_allows_it() -> None:
    fsdp2 = config.resolve("gpt", "tiny", {"dist": "fsdp2"})
    used = [p for p in config.PRECISIONS if train.fp8_all_gather_for(fsdp2, p)]
    assert used == ["tensorwise", "delayed", "blockwise", "int8"]
    off = dataclasses.replace(fsdp2, fp8_all_gather=False)
    ddp = config.resolve("gpt", "tiny", {"dist": "ddp"})
    for cfg in (off, ddp, config.resolve("gpt", "tiny", {})):
        assert not any(train.fp8_all_gather_for(cfg, p) for p in config.PRECISIONS)
    required = dataclasses.replace(fsdp2, fp8_all_gather=True)
    assert train.fp8_all_gather_for(required, "blockwise")
    assert not train.fp8_all_gather_for(required, "bf16")  # no FP8 weights to gather
    with pytest.raises(LabError, match=r"recipe mxfp8 cannot all-gather FP8 weights: .*grad_input"):
        train.fp8_all_gather_for(required, "mxfp8")


def test_default_dimensions_suit_block_recipes() -> None:
    # Whole 128-element blocks in every gemm of the default GPT.
    cfg = config.resolve("gpt", "default", {})
    assert cfg.d_model % 128 == 0 and (cfg.batch * cfg.seq) % 128 == 0


def test_lr_schedule_warmup_then_cosine() -> None:
    cfg = config.resolve("gpt", "default", {"steps": 100, "warmup_steps": 10, "lr": 1.0})
    lrs = [train.lr_at(s, cfg) for s in range(100)]
    assert lrs[9] == 1.0 and lrs[0] == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(cfg.min_lr_ratio)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))


def test_corpus_is_deterministic_and_split(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"b" * 1000)
    (tmp_path / "a.txt").write_bytes(b"a" * 1000)
    c1 = data.load_corpus(str(tmp_path), corpus_mb=1, val_fraction=0.05, seq=32)
    c2 = data.load_corpus(str(tmp_path), corpus_mb=1, val_fraction=0.05, seq=32)
    assert c1.sha256 == c2.sha256
    assert bytes(c1.train[:1000].tolist()) == b"a" * 1000  # sorted paths: a before b
    assert c1.val.numel() == 100 and bytes(c1.val.tolist()) == b"b" * 100  # the last 5%
    capped = data.load_corpus(str(tmp_path), corpus_mb=1500 / 2**20, val_fraction=0.05, seq=32)
    assert capped.train.numel() + capped.val.numel() == 1500 and capped.truncated


def test_stdlib_corpus_skips_tests_and_site_packages() -> None:
    root, files = data.stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert not any(part in {"site-packages", "test", "tests"} for r in rel for part in r.split("/"))
    assert all(r.endswith(".py") for r in rel)


def test_batches_follow_the_seed_and_eval_windows_are_fixed() -> None:
    corpus = torch.arange(256, dtype=torch.uint8).repeat(20)
    x1, y1 = data.sample_windows(corpus, 4, 16, torch.Generator().manual_seed(3))
    x2, _ = data.sample_windows(corpus, 4, 16, torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2) and x1.dtype == torch.int64 and x1.shape == (4, 16)
    assert torch.equal(y1[:, :-1], x1[:, 1:])  # targets are the next bytes
    ex, _ = data.eval_windows(corpus, 8, 16)
    assert torch.equal(ex, data.eval_windows(corpus, 8, 16)[0]) and len(ex) == 8


class _SaveFp8(torch.autograd.Function):
    """Saves an FP8 copy of its input, as an FP8 linear does."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x.to(torch.float8_e4m3fn))
        return x * 2

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return g * 2


def test_saved_bytes_counts_real_fp8_size_once() -> None:
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(32, 32))
    meter = train.SavedTensorBytes(iter([w]))
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        y = _SaveFp8.apply(x)  # saves 64 * 32 one-byte codes
        z = y @ w  # saves y (fp32, 64 * 32 * 4 bytes); w is a parameter: excluded
        (z.sum() + (y * y).sum()).backward()  # y * y saves y twice more: counted once
    assert meter.total == 64 * 32 * 1 + 64 * 32 * 4


def _run(gap: float | None, se: float | None, diverged: bool = False, skipped: int = 0) -> dict:
    return {
        "val_loss_gap_vs_bf16_pct": gap,
        "val_loss_gap_vs_bf16_se_pct": se,
        "diverged": diverged,
        "skipped_steps": skipped,
    }


def test_verdicts_never_claim_less_than_the_noise() -> None:
    v = compare.verdict
    assert v("delayed", _run(0.5, 0.4), None, 3).startswith("indistinguishable")
    assert v("delayed", _run(-0.5, 0.3), None, 3).startswith("indistinguishable")
    assert v("delayed", _run(1.2, 0.3), None, 3).startswith("worse")  # 4 SE
    assert v("delayed", _run(-1.2, 0.3), None, 3).startswith("better")
    floor = {"fp32_vs_bf16_gap_pct": -0.8, "fp32_vs_bf16_se_pct": None}
    assert v("rowwise", _run(0.5, None), floor, 1).startswith("indistinguishable")
    one = v("rowwise", _run(1.2, None), floor, 1)
    assert one.startswith("possibly worse") and "no standard error" in one
    assert v("rowwise", _run(1.2, None), None, 1).startswith("no verdict")
    assert "no standard error" in v("fp32", _run(0.3, None), floor, 1)
    assert v("int8", _run(None, None, diverged=True), floor, 1).startswith("diverged")
    assert "3 steps skipped" in v("mxfp8", _run(0.1, 0.5, skipped=3), None, 2)


def test_summarize_pairs_gaps_by_seed() -> None:
    cfg = config.resolve("gpt", "tiny", {"precisions": ("bf16", "fp32"), "seeds": 2})

    def rec(seed: int, loss: float) -> dict:
        return {
            "seed": seed,
            "final_val_loss": loss,
            "final_metrics": {"val_loss": loss},
            "median_step_s": 0.1,
            "saved_activation_bytes": 10,
            "skipped_steps": 0,
            "loss_scaler": None,
            "converted_linears": "0/1",
            "curves": {
                "train_step": [1],
                "train_loss": [loss],
                "val_step": [0, 1],
                "val_loss": [5.0, loss],
            },
        }

    out = compare.summarize(
        cfg, {"bf16": [rec(0, 2.0), rec(1, 3.0)], "fp32": [rec(0, 2.02), rec(1, 3.03)]}
    )
    fp32 = out["runs"]["fp32"]
    assert fp32["val_loss_gap_vs_bf16_pct"] == pytest.approx(1.0)  # 1% on both seeds
    assert fp32["val_loss_gap_vs_bf16_se_pct"] == pytest.approx(0.0, abs=1e-9)
    assert fp32["curves"]["val_loss"] == pytest.approx([5.0, 2.525])
    assert out["noise_floor"]["fp32_vs_bf16_gap_pct"] == pytest.approx(1.0)
    assert not math.isnan(fp32["step_time_vs_bf16"])


def test_every_named_precision_has_a_colour_of_its_own() -> None:
    """The curves tell runs apart by colour: the default precisions, the FP4 recipes, the
    torchao peers and every ablation of a recipe each get their own (none falls back to
    the shared grey of an unknown name), a "+fp8act" variant its recipe's."""
    from fp8train.lab.report import _color

    names = [*config.PRECISIONS, *config.FP4_RECIPES, *config.PEER_PRECISIONS]
    names += [f"nvfp4~{a}" for a in config.ABLATIONS]
    colours = [_color(p) for p in names]
    assert len(set(colours)) == len(colours), dict(zip(names, colours, strict=True))
    assert _color("tensorwise+fp8act") == _color("tensorwise")
