"""The fused kernels compute exactly what the reference pipeline computes, eager and
compiled alike (bitwise: the arithmetic is the same op for op)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import pickle

import pytest
import torch
from torch import nn

import fp8train
from fp8train._kernels import ByteRoutes, Kernels, capture, cast_with_operand, encoders, fused
from fp8train._kernels import auto as auto_module
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
        _, _, payload, _ = kernels.quantize_given(x, scale, spec, None)
        assert_bitwise_equal(payload, reference, f"{kernels.mode} {name} given scale")


@pytest.mark.parametrize("algo", ["max", "most_recent"])
@pytest.mark.parametrize("name", ["e5m2-tensor-pow2", "e4m3-row", "e4m3-block1x128"])
def test_scale_from_the_window_in_the_kernel_call(name: str, algo: str) -> None:
    """quantize_from_window (delayed scaling's scale from its history, reduced inside the
    kernel call) gives the bits of the history's own reduction, scale_from_amax and
    quantize_given, eager and compiled, for a window still filling and a full one."""
    spec = OWN_AMAX_SPECS[name]
    history = fp8train.AmaxHistory(4, algo)
    for records in (2, 6):  # partly filled, then wrapped around
        while history.count < records:
            x = torch.randn(64, 256) * (1 + history.count)
            history.record(compute_amax(x, spec))
        x = torch.randn(64, 256).bfloat16() * 3
        expected_scale = scale_from_amax(history.reduced(), spec)
        expected = Kernels("eager").quantize_given(x, expected_scale, spec, torch.float32)
        for kernels in (Kernels("eager"), COMPILED):
            *got, window_amax = kernels.quantize_from_window(
                x, history.to_reduce(), spec, torch.float32
            )
            what = f"{kernels.mode} {name} {algo} after {records}"
            assert_bitwise_equal(window_amax, history.reduced(), f"{what} window amax")
            assert_nested_bitwise_equal(tuple(got), expected, what)


BYTE_ROUTES = {
    "conversion": ByteRoutes(),
    "bit-fields": ByteRoutes(payload_bytes="bit_fields"),
    "bit-fields-via-fp32": ByteRoutes(payload_bytes="bit_fields", code_bytes="via_fp32"),
}


@pytest.mark.parametrize("route", list(BYTE_ROUTES))
def test_compiled_payload_bytes_by_every_route_equal_the_reference(
    route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled CPU kernels make FP8 bytes by torch's conversion (the default) or from
    fp32 bit fields, their int32 codes turned into bytes directly or through fp32: which
    is faster depends on the CPU (benchmarks/cast.py measures it). Every route (forced
    here, whatever this CPU is) gives the reference pipeline's payload: alone and beside
    an operand, without the clamp (own-amax scales) and with it (a scale 8x too large,
    so products saturate); and the route asked for is the one traced."""
    routes = BYTE_ROUTES[route]
    bit_field_calls = []
    for fn_name in ("fp8_codes", "fp8_grid_bytes"):
        real = getattr(encoders, fn_name)

        def spy(*args, real=real, **kwargs):  # type: ignore[no-untyped-def]
            bit_field_calls.append((real.__name__, kwargs["code_bytes"]))
            return real(*args, **kwargs)

        monkeypatch.setattr(encoders, fn_name, spy)
    # graphs traced afresh (the spies see the tracing)
    current = capture._StandaloneCompiled(fused.quantize_current)
    given = capture._StandaloneCompiled(fused.quantize_given)
    gen = torch.Generator().manual_seed(3)
    # Both formats and input dtypes; the granularities share this code (each pair
    # compiles several graphs, seconds each on a small CPU).
    for name, dtype in (("e4m3-tensor", torch.bfloat16), ("e5m2-row", torch.float32)):
        spec = OWN_AMAX_SPECS[name]
        x = (torch.randn(130, 256, generator=gen) * torch.logspace(-8, 3, 256)).to(dtype)
        reference = fp8train.quantize(x, spec)
        what = f"{route} {name} {dtype}"
        for work in (None, torch.float32):
            _, _, payload, _ = current(x, spec, work, True, routes)
            assert_bitwise_equal(payload, reference.data, f"{what} payload, operand {work}")
        big = reference.scale * 8
        saturated = apply_scale_and_cast(x, big, spec)
        assert bool((saturated.float().abs() == spec.fmt.max).any()), f"{what}: none saturated"
        for work in (None, torch.float32):
            _, _, payload, _ = given(x, big, spec, work, True, routes)
            assert_bitwise_equal(payload, saturated, f"{what} saturated, operand {work}")
    traced = {fn for fn, _ in bit_field_calls}
    if routes.payload_bytes == "convert":
        assert not bit_field_calls, f"traced {traced}"
    else:
        assert traced == {"fp8_codes", "fp8_grid_bytes"}, traced
        assert {cb for _, cb in bit_field_calls} == {routes.code_bytes}


def test_eager_kernels_take_every_byte_route_with_the_same_bits() -> None:
    """The routes are arguments of the kernel set, eager as compiled: each gives the
    default's payload and restored operand."""
    spec = OWN_AMAX_SPECS["e4m3-row"]
    x = torch.randn(64, 128) * torch.logspace(-3, 3, 128)
    default = Kernels("eager")
    amax, scale, payload, operand = default.quantize_current(x, spec, torch.float32)
    assert payload is not None
    restored = default.payload_to_operand(payload, scale, spec, torch.bfloat16)
    for route, routes in BYTE_ROUTES.items():
        for words in (False, True):
            kernels = Kernels(
                "eager",
                payload_bytes=routes.payload_bytes,
                code_bytes=routes.code_bytes,
                restore_from_words=words,
            )
            got = kernels.quantize_current(x, spec, torch.float32)
            assert_nested_bitwise_equal(got, (amax, scale, payload, operand), f"{route}")
            assert_bitwise_equal(
                kernels.payload_to_operand(payload, scale, spec, torch.bfloat16),
                restored,
                f"{route} words={words} restored",
            )


def test_byte_routes_are_part_of_the_graph_key() -> None:
    """Each route is a constant of its own graph: the same call with other routes
    compiles another graph instead of reusing one traced for a different route."""
    compiled = capture._StandaloneCompiled(fused.cast_with_operand)
    spec = SPECS["e4m3-row"]
    x = torch.randn(32, 64)
    scale = scale_from_amax(compute_amax(x, spec), spec)
    for routes in (ByteRoutes(), ByteRoutes(payload_bytes="bit_fields")):
        compiled(x, scale, spec, None, True, True, routes)
    assert len(compiled.graphs) == 2


def test_kernel_options_are_validated_and_kept_by_copies() -> None:
    with pytest.raises(ValueError, match="'convert' or 'bit_fields'"):
        Kernels("compiled", payload_bytes="bits")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'direct' or 'via_fp32'"):
        Kernels("eager", payload_bytes="bit_fields", code_bytes="fp32")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only applies with payload_bytes='bit_fields'"):
        Kernels("eager", code_bytes="via_fp32")
    with pytest.raises(TypeError, match="bool"):
        Kernels("eager", restore_from_words="yes")  # type: ignore[arg-type]
    kernels = Kernels("compiled", payload_bytes="bit_fields", restore_from_words=True)
    for clone in (copy.deepcopy(kernels), pickle.loads(pickle.dumps(kernels))):
        assert clone.mode == "compiled" and clone.routes == kernels.routes
    assert "bit_fields" in repr(kernels) and repr(Kernels("auto")) == "Kernels('auto')"


def test_auto_resolves_to_compiled_here(caplog: pytest.LogCaptureFixture) -> None:
    """This machine has standalone_compile and a C++ compiler: "auto" is "compiled" on
    the CPU, and says so once."""
    assert auto_module.compile_blocker("cpu") is None
    auto_module.resolve_auto.cache_clear()
    with caplog.at_level(logging.INFO, logger="fp8train"):
        assert Kernels("auto").resolved("cpu") == "compiled"
        assert Kernels("auto").resolved(torch.device("cpu")) == "compiled"
    lines = [r.getMessage() for r in caplog.records if r.name == "fp8train"]
    assert len(lines) == 1 and "chose 'compiled' on cpu" in lines[0], lines
    assert Kernels("eager").resolved("cpu") == "eager"


def test_auto_falls_back_to_eager_and_logs_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the device cannot compile, "auto" runs the eager kernels (the same bits)
    and logs the reason once per process."""
    monkeypatch.setattr(auto_module, "compile_blocker", lambda device_type: "no compiler here")
    auto_module.resolve_auto.cache_clear()
    compiled_fns = []
    monkeypatch.setattr(
        "fp8train._kernels.kernel_set.compiled", lambda fn: compiled_fns.append(fn) or fn
    )
    try:
        with caplog.at_level(logging.INFO, logger="fp8train"):
            kernels = Kernels("auto")
            spec = SPECS["e4m3-row"]
            x = torch.randn(16, 32)
            got = kernels.quantize_current(x, spec, torch.float32)
            kernels.quantize_current(x, spec, None)
            assert kernels.resolved("cpu") == "eager"
        assert_nested_bitwise_equal(
            got, Kernels("eager").quantize_current(x, spec, torch.float32), "auto as eager"
        )
        assert not compiled_fns, "auto compiled although the device cannot"
        lines = [r.getMessage() for r in caplog.records if r.name == "fp8train"]
        assert lines == ["fp8train: kernels='auto' chose 'eager' on cpu: no compiler here"]
        # the slow path is announced as a warning
        assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "fp8train")
    finally:
        auto_module.resolve_auto.cache_clear()  # later tests see the real capability


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


# The kernel methods a layer may call with a choice of payloads, and that argument.
KEEP_ARGUMENTS = {
    "cast_with_operand": "keep_payload",
    "quantize_current": "keep_payload",
    "quantize_given": "keep_payload",
}


def _all_layers(name: str) -> fp8train.Recipe:
    return dataclasses.replace(fp8train.Recipe.from_name(name), high_precision_last=0)


@pytest.mark.parametrize("recipe", [r for r in fp8train.RECIPE_NAMES if not r.startswith("int8")])
def test_layer_skipping_payloads_matches_keeping_them(recipe: str) -> None:
    """Without an observer the layer makes FP8 payloads only for what backward stores
    (dy's never); outputs and gradients are bitwise those of a run that keeps every
    payload (an observer forces them).

    Eager kernels: which payloads a layer asks for is decided outside the kernels, and
    the compiled kernels without a payload are checked bit for bit against eager above
    (test_operand_without_payload_has_the_same_bits); compiling both variants of every
    recipe here would cost many seconds a recipe on a small CPU."""
    base = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
    models = {
        # Every layer converted (nvfp4 would keep its last 4 Linear layers unconverted).
        keep: fp8train.convert(copy.deepcopy(base), _all_layers(recipe), kernels="eager")
        for keep in (True, False)
    }
    calls: list[tuple[bool, ...]] = []  # the keep flags of every kernel call
    for _, layer in fp8_layers(models[True]):
        layer.fp8_state.observer = lambda *args: None
    for _, layer in fp8_layers(models[False]):
        state = layer.fp8_state
        state.kernels = copy.copy(state.kernels)
        for method, arg in KEEP_ARGUMENTS.items():
            real = getattr(state.kernels, method)

            def spy(*args, real=real, arg=arg, **kwargs):  # type: ignore[no-untyped-def]
                bound = inspect.signature(real).bind(*args, **kwargs)
                bound.apply_defaults()
                keep = bound.arguments[arg]
                calls.append(keep if isinstance(keep, tuple) else (keep,))
                return real(*args, **kwargs)

            setattr(state.kernels, method, spy)
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
    assert any(not all(keeps) for keeps in calls), f"{recipe}: every payload was made"


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


@pytest.mark.parametrize("words", [True, False], ids=["words", "inductor-conversion"])
@pytest.mark.parametrize(
    "name", ["e4m3-tensor-pow2", "e5m2-tensor", "e4m3-row", "e4m3-block1x128", "e4m3-mx"]
)
def test_compiled_restore_reads_payload_words_with_the_eager_bits(name: str, words: bool) -> None:
    """Compiled, payload_to_operand reads an FP8 payload as int32 words
    (fp8train._kernels.encoders.fp8_word_values) with ``restore_from_words`` (faster
    where inductor converts FP8 bytes in scalar code), and converts it with inductor's
    code by default; both (forced here, whatever this CPU is) give the eager restore's
    bits for every code (NaN and inf included), for a last dimension that is no multiple
    of 4 (read byte by byte), and for a payload starting at an odd byte of its storage
    (copied first)."""
    from fp8train._kernels import payload_to_operand

    compiled = capture._StandaloneCompiled(payload_to_operand)  # graphs traced afresh
    routes = ByteRoutes(restore_from_words=words)

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
                compiled(p, scale, spec, dtype, routes),
                payload_to_operand(p, scale, spec, dtype),
                f"{name} {what} {dtype}",
            )


def _two_operands(
    tensors: tuple[torch.Tensor, ...],
    specs: tuple[ScaleSpec, ...],
    works: tuple[torch.dtype, ...],
    keeps: tuple[bool, ...],
) -> tuple[object, ...]:
    """Two operands quantised in one traced function, with row counts of their own."""
    return tuple(
        fused.quantize_current(t, s, w, k)
        for t, s, w, k in zip(tensors, specs, works, keeps, strict=True)
    )


def _two_operand_args(spec_names: tuple[str, str], rows: tuple[int, int]) -> tuple[object, ...]:
    specs = tuple(SPECS[n] for n in spec_names)
    torch.manual_seed(sum(rows))
    tensors = (torch.randn(rows[0], 96).bfloat16() * 3, torch.randn(rows[1], 64))
    return (tensors, specs, (torch.bfloat16, torch.float32), (False, True))


@pytest.mark.parametrize(
    "spec_names",
    [("e5m2-tensor", "e4m3-row"), ("e4m3-mx", "e4m3-col"), ("e4m3-block1x128", "e4m3-block128")],
)
def test_compiled_graphs_follow_the_row_count(spec_names: tuple[str, str]) -> None:
    """One compiled graph serves every row count it was traced for, each operand's its
    own (equal counts at tracing do not tie them); where tracing had to assume something
    of the rows (whole 32- or 128-row blocks) or needed them concrete, a row count
    outside that gets a graph of its own, never a wrong result. Every call gives the
    eager bits."""
    standalone = capture.compiled(_two_operands)  # one wrapper per function
    assert isinstance(standalone, capture._StandaloneCompiled)
    before = sum(len(g) for g in standalone.graphs.values())
    for rows in ((256, 256), (96, 256), (130, 64), (256, 256), (1, 96)):
        args = _two_operand_args(spec_names, rows)
        expected = _two_operands(*args)
        assert_nested_bitwise_equal(
            standalone(*args), expected, f"standalone {spec_names} {rows} rows"
        )
    made = sum(len(g) for g in standalone.graphs.values()) - before
    # 1 row specialises (its own key); the other pairs share one graph unless tracing
    # constrained the rows; the second (256, 256) never compiles again.
    assert 2 <= made <= 4, f"{made} graphs compiled for 4 distinct pairs of row counts"
    if spec_names[0] == "e5m2-tensor":
        assert made == 2, "a tensorwise/rowwise step should take any row count"


def test_a_graph_specialised_to_a_row_count_is_not_reused_for_another() -> None:
    """Fewer rows than a block: tracing pads to one block and specialises the row count
    to a constant, of which the guard expression says nothing. A tensor of the same key
    with another row count (the MX layer's 10-row weight, then its 3-row input, both
    quantised along the rows) must get a graph of its own, not the 10-row one."""
    standalone = capture.compiled(_two_operands)
    for rows in ((10, 10), (3, 3), (10, 10), (5, 7)):
        args = _two_operand_args(("e4m3-block128", "e4m3-block128"), rows)
        expected = _two_operands(*args)
        assert_nested_bitwise_equal(standalone(*args), expected, f"block128 {rows} rows")


@pytest.mark.parametrize("module", ["formats", "_bits", "cast", "scaling", "history", "tensor"])
def test_the_reference_layer_imports_nothing_from_the_speed_layer(module: str) -> None:
    """The dependency arrows point down: the reference modules import neither
    fp8train._kernels nor its re-export fp8train.kernels (the kernels are tested against
    them, so they must not be built from the kernels)."""
    import ast
    import importlib

    source = importlib.import_module(f"fp8train.{module}").__file__
    assert source is not None
    with open(source, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    speed = {m for m in imported if m.startswith(("fp8train._kernels", "fp8train.kernels"))}
    assert not speed, f"fp8train.{module} imports {sorted(speed)}"
