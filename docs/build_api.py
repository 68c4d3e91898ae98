"""Build the API reference from the docstrings, and fail on a broken one.

    python docs/build_api.py [--out build/api]

Two passes over the public API (every module below, and every public class, function,
method and property in it):

1. **Check.** Each docstring is parsed as reStructuredText by docutils. An unclosed
   ``literal``, a bad indentation or a malformed list is an error that names the object;
   so is a public module, class or function without a docstring (methods and properties
   may go without one, where their name says it all). Sphinx-style cross-reference roles
   (``:func:``, ``:class:`` ...) are accepted as plain text, since pdoc renders them so.
2. **Render.** pdoc writes the HTML reference; any warning it raises fails the build,
   except the one it gives for attributes a ``torch.Tensor`` subclass inherits from C
   code (pdoc cannot find their source file, which says nothing about our docstrings).

CI runs this; the exit status is 1 when anything failed.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

# The public API: the package and the modules a user imports from.
MODULES = [
    "fp8train",
    "fp8train.formats",
    "fp8train.cast",
    "fp8train.scaling",
    "fp8train.history",
    "fp8train.tensor",
    "fp8train.recipes",
    "fp8train.matmul",
    "fp8train.autograd",
    "fp8train.nn",
    "fp8train.activations",
    "fp8train.loss_scaler",
    "fp8train.monitor",
    "fp8train.distributed",
    "fp8train.checkpoint",
    "fp8train.testing",
]

_ROLES = ("func", "class", "meth", "attr", "data", "mod", "exc", "obj")
_BENIGN_PDOC = ("Cannot determine where",)


def _register_roles() -> None:
    from docutils import nodes
    from docutils.parsers.rst import roles

    def as_literal(name, rawtext, text, lineno, inliner, options=None, content=None):  # type: ignore[no-untyped-def]
        return [nodes.literal(rawtext, text)], []

    for role in _ROLES:
        roles.register_local_role(role, as_literal)


def rst_problems(text: str) -> list[str]:
    """docutils' warnings and errors for ``text`` parsed as reStructuredText."""
    from docutils.core import publish_doctree
    from docutils.utils import Reporter

    problems: list[str] = []

    class Collect:
        def write(self, message: str) -> None:
            if message.strip():
                problems.append(message.strip())

    publish_doctree(
        inspect.cleandoc(text),
        settings_overrides={
            "report_level": Reporter.WARNING_LEVEL,
            "halt_level": Reporter.SEVERE_LEVEL + 1,
            "warning_stream": Collect(),
            "file_insertion_enabled": False,
            "raw_enabled": False,
        },
    )
    return problems


def _public_members(module: ModuleType) -> Iterator[tuple[str, object]]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name)
        # Ours, whichever submodule defines it (a package re-exports its parts' API).
        ours = str(getattr(obj, "__module__", "")).split(".")[0] == "fp8train"
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and ours:
            yield f"{module.__name__}.{name}", obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr.startswith("_"):
                        continue
                    target = member.fget if isinstance(member, property) else member
                    if isinstance(target, (staticmethod, classmethod)):
                        target = target.__func__
                    if inspect.isfunction(target):
                        yield f"{module.__name__}.{name}.{attr}", target


def check(modules: list[str]) -> list[str]:
    """Every problem found in the docstrings of ``modules``' public API."""
    _register_roles()
    failures: list[str] = []
    seen: set[int] = set()  # an object re-exported by several modules is checked once
    for module_name in modules:
        module = importlib.import_module(module_name)
        objects: list[tuple[str, object]] = [(module_name, module), *_public_members(module)]
        for qualname, obj in objects:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            doc = obj.__doc__ if inspect.ismodule(obj) else inspect.getdoc(obj)
            if not doc:
                if qualname.count(".") - module_name.count(".") <= 1:
                    failures.append(f"{qualname}: no docstring")
                continue
            failures.extend(f"{qualname}: {p}" for p in rst_problems(doc))
    return failures


def render(modules: list[str], out: Path) -> list[str]:
    """Write the HTML reference; return pdoc's warnings that are not benign."""
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="restructuredtext", show_source=True)
    # The package's own page already takes in the submodules its __all__ names.
    top = importlib.import_module(modules[0])
    named = {f"{top.__name__}.{n}" for n in getattr(top, "__all__", ())}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*(m for m in modules if m not in named), output_directory=out)
    return [
        f"pdoc: {w.message}"
        for w in caught
        if not any(str(w.message).startswith(b) for b in _BENIGN_PDOC)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/api"), help="output folder")
    args = parser.parse_args(argv)
    failures = check(MODULES) + render(MODULES, args.out)
    for failure in failures:
        print(failure, file=sys.stderr)
    if failures:
        print(f"API docs: {len(failures)} problem(s)", file=sys.stderr)
        return 1
    print(f"API docs: {len(MODULES)} modules checked and written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
