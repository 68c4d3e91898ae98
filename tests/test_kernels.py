"""The fused kernels compute exactly what the reference pipeline computes, eager and
compiled alike (bitwise: the arithmetic is the same op for op)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import fp8train
from fp8train.kernels import Kernels, cast_with_operand
from fp8train.nn import fp8_layers
from fp8train.scaling import (
    Granularity,
    ScaleSpec,
    apply_scale_and_cast,
    compute_amax,
    expand_scale,
    scale_from_amax,
)
from fp8train.testing import (
    assert_bitwise_equal,
    assert_nested_bitwise_equal,
    fp32_sum_gamma,
)

G = Granularity
SPECS = {
    "e4m3-tensor-pow2": ScaleSpec(power_of_two=True),
    "e5m2-tensor": ScaleSpec(fmt="e5m2"),
    "e4m3-row": ScaleSpec(granularity=G.ROW, power_of_two=True),
    "e4m3-col": ScaleSpec(granularity=G.ROW, axis=0, power_of_two=True),
    "e4m3-block1x128": ScaleSpec(granularity=G.BLOCK, block=(1, 128), power_of_two=True),
    "e4m3-block128": ScaleSpec(granularity=G.BLOCK, block=(128, 128), power_of_two=True),
    "e4m3-mx": ScaleSpec(granularity=G.MX, block=(1, 32)),
    "int8-row": ScaleSpec(fmt="int8", granularity=G.ROW),
}
COMPILED = Kernels("compiled")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(SPECS))
def test_cast_with_operand_matches_reference_pipeline(name: str, dtype: torch.dtype) -> None:
    spec = SPECS[name]
    x = (torch.randn(130, 200) * torch.logspace(-3, 3, 200)).to(dtype)  # many binades
    scale = scale_from_amax(compute_amax(x, spec), spec)
    reference = apply_scale_and_cast(x, scale, spec)  # fp8train.cast, with its checks
    # Both GEMM routes' operand dtypes (fp8train.matmul.gemm_dtype): bf16 only where
    # the scales are powers of two, fp32 always possible.
    works = (torch.bfloat16, torch.float32) if spec.scales_are_power_of_two else (torch.float32,)
    for work, kernels in [(w, k) for w in works for k in (Kernels("eager"), COMPILED)]:
        expected_operand = fp8train.ScaledTensor(reference, scale, spec, dtype).dequantize(work)
        payload, operand = kernels.cast_with_operand(x, scale, spec, work)
        what = f"{kernels.mode} {name} {work}"
        assert_bitwise_equal(payload, reference, f"{what} payload")
        assert operand is not None and operand.dtype == work
        assert_bitwise_equal(operand, expected_operand, f"{what} operand")
        assert_bitwise_equal(kernels.amax(x, spec), compute_amax(x, spec), f"{what} amax")


OWN_AMAX_SPECS = {
    "e4m3-tensor": ScaleSpec(),
    "e4m3-tensor-margin": ScaleSpec(margin=1),
    "e5m2-tensor-pow2": ScaleSpec(fmt="e5m2", power_of_two=True),
    "e4m3-row": ScaleSpec(granularity=G.ROW),
    "e5m2-row": ScaleSpec(fmt="e5m2", granularity=G.ROW),
    "e4m3-col": ScaleSpec(granularity=G.ROW, axis=0),
    "e4m3-col-pow2": ScaleSpec(granularity=G.ROW, axis=0, power_of_two=True),
    "e4m3-block1x128": ScaleSpec(granularity=G.BLOCK, block=(1, 128)),
    "e5m2-block128-pow2": ScaleSpec(
        fmt="e5m2", granularity=G.BLOCK, block=(128, 128), power_of_two=True
    ),
    "e4m3-mx": ScaleSpec(granularity=G.MX, block=(1, 32)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(OWN_AMAX_SPECS))
def test_current_scaling_without_clamp_matches_reference(name: str, dtype: torch.dtype) -> None:
    """quantize_current skips the saturating clamp where the scale comes from the tensor's
    own amax (not MX): every |x * scale| then stays within an fp32 ulp or two of max,
    which rounds to max by itself. Rows and columns scaled by random factors give
    hundreds to thousands of amaxes per tensor for row, column and block scales (200
    columns: partial 1x128, 128x128 and 1x32 tiles); the tensorwise amax is set to
    1.2109375 * 2**5, for which fp32's max / amax rounds up. So products land just above
    max before rounding (asserted where the scale is not rounded down); payload and
    operand must equal the reference pipeline's (fp8train.quantize, which clamps), eager
    and compiled."""
    spec = OWN_AMAX_SPECS[name]
    gen = torch.Generator().manual_seed(7)
    rows = torch.exp2(torch.rand(3000, 1, generator=gen) * 40 - 20)  # 2^-20 .. 2^20
    cols = torch.exp2(torch.rand(1, 200, generator=gen) * 8 - 4)
    x = (torch.randn(3000, 200, generator=gen) * rows * cols).to(dtype)
    if spec.granularity is G.TENSOR:
        x = torch.randn(3000, 200, generator=gen).clamp(-1, 1).to(dtype) * (1.2109375 * 32)
    reference = fp8train.quantize(x, spec)
    if spec.granularity is not G.MX and spec.margin == 0 and not spec.power_of_two:
        products = x.float() * expand_scale(reference.scale, tuple(x.shape), spec)
        assert bool((products.abs() > spec.fmt.max).any()), "no product above max: test is moot"
    work = torch.bfloat16 if spec.scales_are_power_of_two else torch.float32
    for kernels in (Kernels("eager"), COMPILED):
        amax, scale, payload, operand = kernels.quantize_current(x, spec, work)
        assert_bitwise_equal(amax, compute_amax(x, spec), f"{kernels.mode} {name} amax")
        assert_bitwise_equal(scale, reference.scale, f"{kernels.mode} {name} scale")
        assert_bitwise_equal(payload, reference.data, f"{kernels.mode} {name} payload")
        assert_bitwise_equal(operand, reference.dequantize(work), f"{kernels.mode} {name} operand")
        _, _, codes_only, _ = kernels.quantize_current(x, spec, None)
        assert_bitwise_equal(codes_only, reference.data, f"{kernels.mode} {name} codes")


@pytest.mark.parametrize("name", ["e4m3-tensor", "e4m3-row", "e4m3-block1x128"])
def test_given_scale_saturates(name: str) -> None:
    """A given (delayed) scale is not the tensor's own: products far past max must still
    saturate, so quantize_given keeps the clamp (eager and compiled)."""
    spec = OWN_AMAX_SPECS[name]
    x = torch.randn(64, 256) * torch.logspace(-2, 2, 256)
    scale = scale_from_amax(compute_amax(x, spec), spec) * 8  # as if amax were 8x smaller
    reference = apply_scale_and_cast(x, scale, spec)
    assert bool((reference.float().abs() == spec.fmt.max).any()), "nothing saturated"
    for kernels in (Kernels("eager"), COMPILED):
        _, _, payload, _ = kernels.quantize_many((x,), (spec,), (None,), (scale,))[0]
        assert_bitwise_equal(payload, reference, f"{kernels.mode} {name} given scale")


def test_byte_route_probe_is_measured_once_per_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bytes_from_bits_faster measures once and keeps the answer on disk for later
    processes; another CPU, thread count or torch (the key), a corrupt memo or an
    unwritable cache directory each mean measuring again, never a wrong or failed
    answer."""
    import json

    from fp8train import kernels

    probe = kernels.bytes_from_bits_faster.__wrapped__  # past the per-process cache
    memo = tmp_path / "inductor" / "fp8train" / "memo.json"
    monkeypatch.setattr(kernels, "_probe_memo_path", lambda: memo)
    timings = {True: 1.0, False: 2.0}  # bit fields faster
    measured = []

    def fake_timing() -> dict[bool, float]:
        measured.append(dict(timings))
        return dict(timings)

    monkeypatch.setattr(kernels, "_time_byte_routes", fake_timing)
    assert probe() is True and len(measured) == 1
    stored = json.loads(memo.read_text())
    assert stored["bytes_from_bits"] is True and stored["key"] == kernels._probe_memo_key()

    timings.update({True: 3.0})  # a new measurement would now say "conversion"
    assert probe() is True and len(measured) == 1, "the memo was not read"

    real_key = kernels._probe_memo_key()
    monkeypatch.setattr(kernels, "_probe_memo_key", lambda: {**real_key, "threads": -1})
    assert probe() is False and len(measured) == 2, "another machine's memo was used"
    assert json.loads(memo.read_text())["key"]["threads"] == -1

    memo.write_text("{not json")
    assert probe() is False and len(measured) == 3
    memo.write_text('["a list"]')
    assert probe() is False and len(measured) == 4

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setattr(kernels, "_probe_memo_path", lambda: blocked / "memo.json")
    assert probe() is False and len(measured) == 5


def test_byte_route_memo_key_survives_json() -> None:
    """The memo's key compares equal after a JSON round trip (else it never hits), and
    names this CPU."""
    import json

    from fp8train.kernels import _probe_memo_key

    key = _probe_memo_key()
    assert json.loads(json.dumps(key)) == key
    assert key["torch"] == torch.__version__ and key["threads"] == torch.get_num_threads()


@pytest.mark.parametrize("from_bits", [True, False], ids=["bit-fields", "conversion"])
def test_compiled_payload_bytes_by_either_route_equal_the_reference(
    from_bits: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled CPU kernels make FP8 bytes from fp32 bit fields or by torch's conversion,
    whichever fp8train.kernels.bytes_from_bits_faster measured faster on this CPU. Both
    (forced here, whatever this CPU is) give the reference pipeline's payload: alone and
    beside an operand, without the clamp (own-amax scales) and with it (a scale 8x too
    large, so products saturate); and the route forced is the one traced."""
    import sys

    from fp8train import kernels

    cast_module = sys.modules["fp8train.cast"]
    monkeypatch.setattr(kernels, "bytes_from_bits_faster", lambda: from_bits)
    bit_field_calls = []
    for fn_name in ("fp8_codes", "fp8_grid_bytes"):
        real = getattr(cast_module, fn_name)

        def spy(*args, real=real, **kwargs):  # type: ignore[no-untyped-def]
            bit_field_calls.append(real.__name__)
            return real(*args, **kwargs)

        monkeypatch.setattr(cast_module, fn_name, spy)
    # graphs traced afresh for this route
    current = kernels._StandaloneCompiled(kernels.quantize_current)
    given = kernels._StandaloneCompiled(kernels.quantize_given)
    gen = torch.Generator().manual_seed(3)
    # Both formats and input dtypes; the granularities share this code (compiling more
    # pairs cost about 18 s each on 2 cores).
    for name, dtype in (("e4m3-tensor", torch.bfloat16), ("e5m2-row", torch.float32)):
        spec = OWN_AMAX_SPECS[name]
        x = (torch.randn(130, 256, generator=gen) * torch.logspace(-8, 3, 256)).to(dtype)
        reference = fp8train.quantize(x, spec)
        what = f"{'bit fields' if from_bits else 'conversion'} {name} {dtype}"
        for work in (None, torch.float32):
            _, _, payload, _ = current(x, spec, work, True)
            assert_bitwise_equal(payload, reference.data, f"{what} payload, operand {work}")
        big = reference.scale * 8
        saturated = apply_scale_and_cast(x, big, spec)
        assert bool((saturated.float().abs() == spec.fmt.max).any()), f"{what}: none saturated"
        for work in (None, torch.float32):
            _, _, payload, _ = given(x, big, spec, work, True)
            assert_bitwise_equal(payload, saturated, f"{what} saturated, operand {work}")
    assert bool(bit_field_calls) is from_bits, f"traced {bit_field_calls or 'no bit fields'}"
    assert from_bits is False or set(bit_field_calls) == {"fp8_codes", "fp8_grid_bytes"}


def test_operand_is_optional() -> None:
    x = torch.randn(8, 16)
    spec = ScaleSpec()
    payload, operand = cast_with_operand(x, torch.tensor(2.0), spec, None)
    assert operand is None and payload.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(SPECS))
def test_operand_without_payload_has_the_same_bits(name: str, dtype: torch.dtype) -> None:
    """keep_payload=False skips the FP8 payload (FP8 specs) and leaves the operand's bits
    unchanged; formats without the float-arithmetic path return their payload anyway."""
    spec = SPECS[name]
    x = (torch.randn(130, 200) * torch.logspace(-3, 3, 200)).to(dtype)
    scale = scale_from_amax(compute_amax(x, spec), spec)
    work = torch.bfloat16 if spec.scales_are_power_of_two else torch.float32
    for kernels in (Kernels("eager"), COMPILED):
        payload, operand = kernels.cast_with_operand(x, scale, spec, work, True)
        no_payload, same_operand = kernels.cast_with_operand(x, scale, spec, work, False)
        assert same_operand is not None and operand is not None
        assert_bitwise_equal(same_operand, operand, f"{kernels.mode} {name} operand")
        if spec.fmt.name == "int8":
            assert no_payload is not None
            assert_bitwise_equal(no_payload, payload, f"{kernels.mode} {name} payload")
        else:
            assert no_payload is None, f"{kernels.mode} {name}: payload made anyway"


@pytest.mark.parametrize("recipe", [r for r in fp8train.RECIPE_NAMES if not r.startswith("int8")])
def test_layer_skipping_payloads_matches_keeping_them(recipe: str) -> None:
    """Without an observer the layer makes FP8 payloads only for what backward stores
    (dy's never); outputs and gradients are bitwise those of a run that keeps every
    payload (an observer forces them).

    Eager kernels: which payloads a layer asks for is decided outside the kernels, and
    the compiled kernels without a payload are checked bit for bit against eager above
    (test_operand_without_payload_has_the_same_bits); compiling both variants of every
    recipe here took 8-40 s a recipe on a 2-core AVX2 CPU (2026-12-01)."""
    base = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
    models = {
        keep: fp8train.convert(copy.deepcopy(base), recipe, kernels="eager")
        for keep in (True, False)
    }
    calls: list[tuple[tuple[str, ...], tuple[bool, ...]]] = []
    for _, layer in fp8_layers(models[True]):
        layer.fp8_state.observer = lambda *args: None
    for _, layer in fp8_layers(models[False]):
        state = layer.fp8_state
        state.kernels = copy.copy(state.kernels)
        prepare = state.kernels.prepare_gemm_operands

        def spy(sources, specs, *rest, prepare=prepare):  # type: ignore[no-untyped-def]
            calls.append((tuple(s.fmt.name for s in specs), rest[3]))  # keep_payloads
            return prepare(sources, specs, *rest)

        state.kernels.prepare_gemm_operands = spy
    x = torch.randn(3, 50, 128)
    results = {}
    for keep, model in models.items():
        for _ in range(2):  # step 2: delayed scaling from its history
            xi = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = model(xi)
            y.float().square().mean().backward()
        results[keep] = [y, xi.grad] + [p.grad for p in model.parameters()]
    for a, b in zip(results[True], results[False], strict=True):
        assert_bitwise_equal(b, a, f"{recipe} output/grad")
    assert calls, "the fused kernels were not called"
    assert any(not all(keeps) for _, keeps in calls), f"{recipe}: every payload was made"


def test_unknown_kernel_mode_raises() -> None:
    with pytest.raises(ValueError, match="eager"):
        Kernels("fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eager"):
        fp8train.convert(nn.Sequential(nn.Linear(16, 16)), "tensorwise", kernels="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("rows", [0, 1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_grad_is_an_fp32_column_sum(dtype: torch.dtype, rows: int) -> None:
    """Eager and compiled, the bias gradient is the column sum of dy accumulated in fp32:
    within fp32 summation's error bound of the float64 sum, gamma_(M-1) sum|dy| for any
    order (a bf16 sum, rounded to bf16 at the end, misses it by far)."""
    dy = (torch.randn(rows, 96) * torch.logspace(-3, 3, 96)).to(dtype)
    exact = dy.double().sum(0)
    bound = fp32_sum_gamma(max(rows - 1, 0)) * dy.double().abs().sum(0)
    for kernels in (Kernels("eager"), COMPILED):
        db = kernels.bias_grad(dy, torch.float32)
        assert db.dtype == torch.float32 and db.shape == (96,)
        excess = ((db.double() - exact).abs() - bound).max().item()
        assert excess <= 0, (
            f"{kernels}: {rows}x96 {dtype} column sum off by {excess} beyond the bound"
        )


def test_one_call_for_many_operands_matches_one_call_each() -> None:
    """quantize_many / restore_many (one compiled call per GEMM step) give the bits of
    quantize_current / payload_to_operand called per operand, eager and compiled."""
    from fp8train.kernels import payload_to_operand, quantize_current

    specs = (
        SPECS["e4m3-tensor-pow2"],
        SPECS["e4m3-block1x128"],
        SPECS["e4m3-mx"],
        SPECS["e4m3-col"],
    )
    tensors = (
        torch.randn(70, 200),
        torch.randn(130, 96).bfloat16(),
        torch.randn(33, 64),
        torch.randn(5, 40),
    )
    works = (torch.bfloat16, torch.bfloat16, None, torch.bfloat16)
    expected = [quantize_current(t, s, w) for t, s, w in zip(tensors, specs, works, strict=False)]
    for kernels in (Kernels("eager"), COMPILED):
        got = kernels.quantize_many(tensors, specs, works)
        for i, (g, e) in enumerate(zip(got, expected, strict=False)):
            for part, a, b in zip(("amax", "scale", "payload", "operand"), g, e, strict=False):
                if b is None:
                    assert a is None
                else:
                    assert_bitwise_equal(a, b, f"{kernels.mode} operand {i} {part}")
        payloads = tuple(e[2] for e in expected)
        scales = tuple(e[1] for e in expected)
        dtypes = (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32)
        restored = kernels.restore_many(payloads, scales, specs, dtypes)
        for i, (p, s, sp, d, r) in enumerate(
            zip(payloads, scales, specs, dtypes, restored, strict=False)
        ):
            assert_bitwise_equal(r, payload_to_operand(p, s, sp, d), f"{kernels.mode} restored {i}")


@pytest.mark.parametrize("words", [True, False], ids=["words", "inductor-conversion"])
@pytest.mark.parametrize(
    "name", ["e4m3-tensor-pow2", "e5m2-tensor", "e4m3-row", "e4m3-block1x128", "e4m3-mx"]
)
def test_compiled_restore_reads_payload_words_with_the_eager_bits(
    name: str, words: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled, payload_to_operand reads an FP8 payload as int32 words
    (fp8train.cast.fp8_word_values) where the CPU has no AVX-512, and converts it with
    inductor's code where it has; both (forced here, whatever this CPU is) give the eager
    restore's bits for every code (NaN and inf included), for a last dimension that is
    no multiple of 4 (read byte by byte), and for a payload starting at an odd byte of
    its storage (copied first)."""
    from fp8train import kernels
    from fp8train.kernels import payload_to_operand

    monkeypatch.setattr(kernels, "_WORD_RESTORES_ON_CPU", words)
    compiled = kernels._StandaloneCompiled(payload_to_operand)  # graphs traced afresh

    spec = SPECS[name]
    assert spec.fmt.torch_dtype is not None
    codes = torch.randint(0, 256, (64, 260), dtype=torch.uint8)
    codes[0, :256] = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    flat = torch.empty(64 * 260 + 1, dtype=torch.uint8)
    flat[1:] = codes.flatten()
    odd = flat[1:].view(64, 260)
    assert odd.storage_offset() == 1
    for payload, what in (
        (codes, "words"),
        (odd, "odd offset"),
        (codes[:, :130].contiguous(), "130 columns"),
    ):
        p = payload.view(spec.fmt.torch_dtype)
        x = torch.randn(payload.shape) * 50
        scale = scale_from_amax(compute_amax(x, spec), spec)
        for dtype in (torch.float32, torch.bfloat16):
            assert_bitwise_equal(
                compiled(p, scale, spec, dtype),
                payload_to_operand(p, scale, spec, dtype),
                f"{name} {what} {dtype}",
            )


def test_gemm_step_in_one_call_matches_the_separate_kernels() -> None:
    """prepare_gemm_operands (a backward step in one compiled call) gives the bits of the
    separate kernels: a saved payload dequantised then re-quantised along the other axis,
    a plain tensor quantised, saved payloads restored, and one finiteness flag that is
    False as soon as any operand holds NaN/inf."""
    from fp8train.kernels import payload_to_operand, quantize_current

    row, col = SPECS["e4m3-block1x128"], SPECS["e4m3-block1x128"].transposed()
    x = torch.randn(130, 256).bfloat16()
    _, x_scale, x_payload, _ = quantize_current(x, row, None)
    dy = torch.randn(130, 96).bfloat16()
    w = torch.randn(96, 256)
    _, w_scale, w_payload, _ = quantize_current(w, SPECS["e4m3-block128"], None)
    saved_x = (x_payload, x_scale, row, torch.bfloat16)
    saved_w = (w_payload, w_scale, SPECS["e4m3-block128"], torch.bfloat16)
    x_hp = payload_to_operand(*saved_x)
    expected = [
        quantize_current(dy, SPECS["e5m2-tensor"], torch.bfloat16),
        quantize_current(x_hp, col, torch.bfloat16),
    ]
    for kernels in (Kernels("eager"), COMPILED):
        dequantised, got, finite, restored = kernels.prepare_gemm_operands(
            (dy, saved_x),
            (SPECS["e5m2-tensor"], col),
            (torch.bfloat16, torch.bfloat16),
            (None, None),
            (saved_w,),
        )
        assert bool(finite) is True
        assert_bitwise_equal(dequantised[0], x_hp, f"{kernels.mode} dequantised x")
        for i, (g, e) in enumerate(zip(got, expected, strict=False)):
            for part, a, b in zip(("amax", "scale", "payload", "operand"), g, e, strict=False):
                assert_bitwise_equal(a, b, f"{kernels.mode} operand {i} {part}")
        assert_bitwise_equal(
            restored[0], payload_to_operand(*saved_w), f"{kernels.mode} restored weight"
        )
        bad = dy.clone()
        bad[7, 3] = float("nan")
        _, _, finite, _ = kernels.prepare_gemm_operands(
            (bad, saved_x),
            (SPECS["e5m2-tensor"], col),
            (torch.bfloat16, torch.bfloat16),
            (None, None),
            (),
        )
        assert bool(finite) is False, kernels.mode


@pytest.mark.parametrize("algo", ["max", "most_recent"])
def test_delayed_scale_from_the_window_in_the_kernel_call(algo: str) -> None:
    """A delayed-scaling window handed to prepare_gemm_operands gives the bits of the
    scale computed beforehand from history.reduced() and passed in, eager and compiled,
    with the ring part full and wrapped alike."""
    from fp8train import AmaxHistory
    from fp8train.kernels import quantize_given

    spec = SPECS["e5m2-tensor"]
    dy = torch.randn(70, 96).bfloat16()
    history = AmaxHistory(length=4, algo=algo)  # type: ignore[arg-type]
    for n, amax in enumerate([3.0, 40.0, 0.5, 7.0, 2.0, 0.25], start=1):
        history.record(torch.tensor(amax))
        expected = quantize_given(
            dy, scale_from_amax(history.reduced(), spec), spec, torch.bfloat16, False
        )
        for kernels in (Kernels("eager"), COMPILED):
            _, got, finite, _ = kernels.prepare_gemm_operands(
                (dy,), (spec,), (torch.bfloat16,), (history.to_reduce(),), (), (False,)
            )
            assert bool(finite)
            for part, a, b in zip(
                ("amax", "scale", "payload", "operand"), got[0], expected, strict=False
            ):
                if b is None:
                    assert a is None
                else:
                    assert_bitwise_equal(a, b, f"{kernels.mode} {algo} record {n} {part}")


def _prepare_args(spec_names: tuple[str, str], rows: tuple[int, int]) -> tuple[object, ...]:
    specs = tuple(SPECS[n] for n in spec_names)
    torch.manual_seed(sum(rows))
    tensors = (torch.randn(rows[0], 96).bfloat16() * 3, torch.randn(rows[1], 64))
    return (tensors, specs, (torch.bfloat16, torch.float32), (None, None), (), (False, True))


@pytest.mark.parametrize(
    "spec_names",
    [("e5m2-tensor", "e4m3-row"), ("e4m3-mx", "e4m3-col"), ("e4m3-block1x128", "e4m3-block128")],
)
def test_compiled_graphs_follow_the_row_count(spec_names: tuple[str, str]) -> None:
    """One compiled graph serves every row count it was traced for, each operand's its
    own (equal counts at tracing do not tie them); where tracing had to assume something
    of the rows (whole 32- or 128-row blocks) or needed them concrete, a row count
    outside that gets a graph of its own, never a wrong result. Every call gives the
    eager bits, through make_fx + standalone_compile and through dynamo."""
    from fp8train.kernels import _compiled, _StandaloneCompiled, prepare_gemm_operands

    standalone = _compiled(prepare_gemm_operands, "standalone")
    dynamo = _compiled(prepare_gemm_operands, "dynamo")
    assert isinstance(standalone, _StandaloneCompiled)
    before = sum(len(g) for g in standalone.graphs.values())
    for rows in ((256, 256), (96, 256), (130, 64), (256, 256), (1, 96)):
        args = _prepare_args(spec_names, rows)
        expected = prepare_gemm_operands(*args)
        assert_nested_bitwise_equal(
            standalone(*args), expected, f"standalone {spec_names} {rows} rows"
        )
        assert_nested_bitwise_equal(dynamo(*args), expected, f"dynamo {spec_names} {rows} rows")
    made = sum(len(g) for g in standalone.graphs.values()) - before
    # 1 row specialises (its own key); the other pairs share one graph unless tracing
    # constrained the rows; the second (256, 256) never compiles again.
    assert 2 <= made <= 4, f"{made} graphs compiled for 4 distinct pairs of row counts"
    if spec_names[0] == "e5m2-tensor":
        assert made == 2, "a tensorwise/rowwise step should take any row count"
