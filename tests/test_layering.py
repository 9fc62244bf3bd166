"""Imports point down (docs/architecture.md): walk every module of svdkernels/ and
fail on an import that points up a layer.

Levels, bottom up: the base modules (backends, errors, builtin) and formats/; the op
layer (ops/, reference/, triton/); linalg/ and calibration; the layers (adapters,
quant, kv, train, compress, analysis); bench/ and the command line. testing/ serves
tests and bench only.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import svdkernels

PACKAGE = Path(svdkernels.__file__).parent

BASE = {"backends", "errors", "builtin", "_C"}
FORMATS = {"formats"}
OPS = {"ops", "reference", "triton"}
LINALG = {"linalg", "calibration"}
LAYERS = {"adapters", "quant", "kv", "train", "compress", "analysis"}
TOP = {"bench", "gpucheck", "__main__", "__init__", "cli"}

# What each part of the package may import from svdkernels (besides itself).
ALLOWED: dict[str, set[str]] = {
    **{name: set(BASE) for name in BASE},
    "formats": BASE,
    **{name: BASE | FORMATS | OPS for name in OPS},
    **{name: BASE | FORMATS | {"ops"} | LINALG for name in LINALG},
    # A layer may build on another layer's public pieces (compress on quant's formats
    # through quant, kv on adapters...), never on bench or testing.
    # Layers reach kernels through the ops only, never a backend directly.
    **{name: BASE | FORMATS | {"ops"} | LINALG | LAYERS for name in LAYERS},
    "testing": BASE | FORMATS | OPS | LINALG | LAYERS,
    **{name: BASE | FORMATS | OPS | LINALG | LAYERS | TOP | {"testing"} for name in TOP},
}


def part_of(module: str) -> str:
    """``svdkernels.ops.rsvd`` -> ``ops``; ``svdkernels`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_in(source: str, here: list[str]) -> list[tuple[int, str]]:
    """Every ``svdkernels...`` module imported by ``source`` (at any depth: imports
    inside functions count too), with its line number; ``here`` is the importing
    module's dotted name as a list (relative imports are resolved against it)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("svdkernels")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "svdkernels":
                # ``from svdkernels import ops`` names a subpackage; ``from svdkernels
                # import rsvd`` a name of the package's __init__.
                found += [(node.lineno, f"svdkernels.{a.name}" if _is_module(a.name) else "svdkernels")
                          for a in node.names]
            elif module.startswith("svdkernels"):
                found.append((node.lineno, module))
    return found


def _is_module(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").exists() or name == "_C"


def dotted(path: Path) -> list[str]:
    return ["svdkernels", *path.relative_to(PACKAGE).with_suffix("").parts]


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_part_is_classified():
    parts = {part_of(".".join(dotted(p))) for p in MODULES}
    assert parts <= set(ALLOWED), f"unclassified parts of the package: {parts - set(ALLOWED)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path):
    me = part_of(".".join(dotted(path)))
    allowed = ALLOWED[me] | {me}
    bad = [f"line {line}: {m}" for line, m in imports_in(path.read_text(), dotted(path)) if part_of(m) not in allowed]
    assert not bad, f"{path.relative_to(PACKAGE)} ({me}) imports upward: {bad}"


def test_the_walker_sees_nested_and_relative_imports():
    # Without this the test above could pass vacuously.
    src = "def f():\n    from svdkernels.adapters import adapt\n    from ..quant import linear\n    import svdkernels.testing\n"
    here = ["svdkernels", "ops", "probe"]
    assert [part_of(m) for _, m in imports_in(src, here)] == ["adapters", "quant", "testing"]
    assert not {"adapters", "quant", "testing"} & ALLOWED["ops"]


def test_testing_does_not_need_pytest_at_import():
    import subprocess
    import sys

    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name == 'pytest' or name.startswith('pytest.') or name == '_pytest':\n"
        "        raise ImportError('pytest imported at import time')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import svdkernels.testing.errors, svdkernels.testing.matrices, svdkernels.testing.models\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
