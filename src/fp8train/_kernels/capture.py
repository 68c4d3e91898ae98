"""Compiling a fused function: traced by ``make_fx``, compiled by inductor's
``standalone_compile``, called directly.

A compiled function compiles lazily on first use, with the row count dynamic and the
other dimensions static: each (spec, dtype, shape but rows, byte routes) compiles once
however many batch sizes and layers use it (a graph whose tracing needed whole blocks
of rows gets a sibling for a row count outside them). The layer then calls inductor's
code directly, without ``torch.compile``'s frame evaluation and guards on every spec
field, which on a small activation cost as much as the kernel. A static last dimension
matters: with it symbolic, inductor's CPU code for 1x128, 128x128 and MX tiles does
index arithmetic per element and is not vectorised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
from torch.utils._python_dispatch import _disable_current_modes

__all__ = ["compiled", "standalone_compile_available"]

F = TypeVar("F", bound=Callable[..., Any])


def standalone_compile_available() -> bool:
    """Whether this torch has ``torch._inductor.standalone_compile`` (it came in 2.8)."""
    import torch._inductor

    return hasattr(torch._inductor, "standalone_compile")


# How a compiled kernel's FP8 output is stored decides how inductor vectorises the
# whole loop: stored as E4M3 it runs full fp32 vectors, stored as E5M2 or as uint8 the
# loop ran several times slower with some inputs. So every E5M2 payload leaves the
# graph viewed as E4M3 bytes and is viewed back (which outputs were E5M2 is known from
# tracing).
def _e5m2_as_e4m3(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.float8_e4m3fn) if t.dtype == torch.float8_e5m2 else t


_COMPILED: dict[Callable[..., Any], _StandaloneCompiled] = {}


def compiled(fn: F) -> F:
    """``fn`` compiled by inductor, one wrapper per function shared by every kernel set
    (so graphs are reused across layers with the same key). Positional arguments only."""
    if fn not in _COMPILED:
        _COMPILED[fn] = _StandaloneCompiled(fn)
    wrapper: Any = _COMPILED[fn]
    result: F = wrapper
    return result


# A call is flattened in one pass into its tensors and a key: the structure, every
# non-tensor argument (specs, dtypes, flags, byte routes: constants of the graph) and per
# tensor its dtype, device and shape, except that a row count of 2 or more (of a tensor
# of rank >= 2) is symbolic in the graph. 0 and 1 rows specialise, hence their own keys.


class _Slot(int):
    """Where a tensor sat in a flattened structure: its index in the tensor list."""


def _flatten(obj: Any, tensors: list[torch.Tensor], key: list[Any]) -> Any:
    """``obj`` with tensors replaced by slots (appended to ``tensors``, described in
    ``key``); nested tuples and lists become tuples."""
    if isinstance(obj, torch.Tensor):
        if not obj.is_contiguous() or (obj.element_size() == 1 and obj.storage_offset() % 4):
            # The graph is traced for contiguous inputs, and may read byte tensors as int32
            # words (ByteRoutes.restore_from_words), which needs a 4-byte aligned offset.
            obj = obj.clone(memory_format=torch.contiguous_format)
        if obj.requires_grad:  # a Parameter: the graph takes plain tensors
            obj = obj.detach()
        shape = obj.shape
        key.append(
            (obj.dtype, obj.device, (min(shape[0], 2), *shape[1:]) if len(shape) >= 2 else shape)
        )
        tensors.append(obj)
        return _Slot(len(tensors) - 1)
    if isinstance(obj, (tuple, list)):
        key.append(len(obj))
        return tuple(_flatten(o, tensors, key) for o in obj)
    key.append(("leaf", obj))
    return obj


def _fill(template: Any, tensors: Any) -> Any:
    """The structure ``_flatten`` took apart, with ``tensors`` back in their slots."""
    if isinstance(template, _Slot):
        return tensors[template]
    if isinstance(template, tuple):
        return tuple(_fill(t, tensors) for t in template)
    return template


def _fake_inputs(tensors: list[torch.Tensor], dynamic_rows: bool) -> tuple[list[Any], Any]:
    """Fake copies of ``tensors`` (row counts symbolic if ``dynamic_rows``) and their fake
    mode, whose shape environment records what tracing and compiling assumed of them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    # duck_shape=False: equal row counts at tracing (x and W both 256 rows) must not
    # become one symbol, or the graph would demand them equal ever after.
    shape_env = ShapeEnv(duck_shape=False)
    mode = FakeTensorMode(shape_env=shape_env)
    fakes = []
    for t in tensors:
        dims = [DimDynamic.STATIC] * t.dim()
        if dynamic_rows and t.dim() >= 2 and t.shape[0] >= 2:
            dims[0] = DimDynamic.DYNAMIC
        fakes.append(
            mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))
        )
    return fakes, mode


class _Graph(NamedTuple):
    run: Callable[..., Any]  # inductor's compiled graph, flat tensors in and out
    out_template: Any  # where its outputs go in the function's result
    e5m2: frozenset[int]  # output slots holding E5M2 payloads viewed as E4M3
    holds: Callable[[list[torch.Tensor]], bool] | None  # which row counts; None: all


def _guard_check(shape_env: Any, fakes: list[Any]) -> Callable[[list[torch.Tensor]], bool] | None:
    """What tracing and compiling assumed of the row counts (e.g. whole 32-row MX
    blocks), as a check on concrete inputs (dynamo's guards, evaluated here since
    nothing else does); None if they assumed nothing."""
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP, is_concrete_int

    # A row count that tracing or compiling specialised (padding a 10-row tensor to one
    # 32-row block, say) is a constant now, and the guard expression says nothing of it:
    # the graph holds for that count only.
    fixed = {
        i: int(f.shape[0])
        for i, f in enumerate(fakes)
        if f.dim() >= 2 and is_concrete_int(f.shape[0]) and int(f.shape[0]) >= 2
    }
    expression = shape_env.produce_guards_expression(fakes)
    if expression is None and not fixed:
        return None
    code = None if expression is None else compile(expression, "<fp8train guards>", "eval")

    def holds(tensors: list[torch.Tensor]) -> bool:
        if any(tensors[i].shape[0] != rows for i, rows in fixed.items()):
            return False
        if code is None:
            return True
        return bool(eval(code, SYMPY_INTERP, {"L": {f"t{i}": t for i, t in enumerate(tensors)}}))

    return holds


class _StandaloneCompiled:
    """``fn`` through make_fx + ``standalone_compile``: ``graphs`` maps each key to the
    graphs compiled for it, each with the row counts it holds for (a new graph is
    compiled when none holds, as dynamo would recompile)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.graphs: dict[tuple[Any, ...], list[_Graph]] = {}

    def compile_graph(self, template: Any, tensors: list[torch.Tensor]) -> _Graph:
        # Traced and compiled outside any dispatch mode the caller has on (a memory or
        # FLOP counter): such a mode would otherwise see the tracing's fake tensors and
        # their symbolic sizes, which it cannot hold (make_fx then fails on an untracked
        # SymInt). The compiled graph itself still runs under the caller's modes.
        with _disable_current_modes():
            return self._compile_graph(template, tensors)

    def _compile_graph(self, template: Any, tensors: list[torch.Tensor]) -> _Graph:
        from torch.fx.experimental.proxy_tensor import make_fx

        out_template: list[Any] = []
        e5m2: set[int] = set()

        def flat_fn(*ts: torch.Tensor) -> list[torch.Tensor]:
            outs: list[torch.Tensor] = []
            out_template[:] = [_flatten(self.fn(*_fill(template, ts)), outs, [])]
            e5m2.update(i for i, t in enumerate(outs) if t.dtype == torch.float8_e5m2)
            return [_e5m2_as_e4m3(t) for t in outs]

        fakes, mode = _fake_inputs(tensors, dynamic_rows=True)
        shapes = None  # the only input shapes a static graph takes
        # An op refusing symbolic sizes is expected here; fake tensors would log it as an
        # error before it reaches us.
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        disabled, fake_log.disabled = fake_log.disabled, True
        try:
            gm = make_fx(flat_fn, tracing_mode="fake")(*fakes)
        except RuntimeError:
            # An op that needs concrete sizes (a block grid's padding): these shapes only.
            shapes = [t.shape for t in tensors]
            fakes, mode = _fake_inputs(tensors, dynamic_rows=False)
            gm = make_fx(flat_fn, tracing_mode="fake")(*fakes)
        finally:
            fake_log.disabled = disabled
        # Compiled in the tracing's own fake mode (its shape environment, without duck
        # shaping): what inductor assumes of the rows joins tracing's guards.
        run = torch._inductor.standalone_compile(
            gm, fakes, dynamic_shapes="from_example_inputs", fake_mode=mode, options={}
        )
        holds: Callable[[list[torch.Tensor]], bool] | None = None
        if shapes is not None:

            def holds(ts: list[torch.Tensor]) -> bool:
                return [t.shape for t in ts] == shapes
        else:
            holds = _guard_check(mode.shape_env, fakes)
        return _Graph(run, out_template[0], frozenset(e5m2), holds)

    def __call__(self, *args: Any) -> Any:
        tensors: list[torch.Tensor] = []
        key: list[Any] = []
        template = _flatten(args, tensors, key)
        candidates = self.graphs.get(tuple(key), ())
        graph = next((g for g in candidates if g.holds is None or g.holds(tensors)), None)
        if graph is None:
            graph = self.compile_graph(template, tensors)
            self.graphs.setdefault(tuple(key), []).append(graph)
        outs = graph.run(*tensors)
        if graph.e5m2:
            outs = [o.view(torch.float8_e5m2) if i in graph.e5m2 else o for i, o in enumerate(outs)]
        return _fill(graph.out_template, outs)
