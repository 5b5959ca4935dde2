"""Imports point one way: ops <- layers <- adapters <- csm <- train; bench is a leaf."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "mlx_fused_lora"
ORDER = ["ops", "layers", "adapters", "csm", "train"]


def imported_subpackages(path: Path, source: str | None = None) -> set[str]:
    """The mlx_fused_lora subpackages a module imports (absolute or relative, lazy ones too)."""
    rel = path.relative_to(PACKAGE).parts
    out = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[: len(rel) - node.level])  # the package the dots name
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] if node.module else [f"{module}.{a.name}".lstrip(".") for a in node.names]
                names = [f"mlx_fused_lora.{n}" for n in names]
            else:
                names = [node.module or ""]
                if node.module == "mlx_fused_lora":
                    names = [f"mlx_fused_lora.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            parts = n.split(".")
            if parts[0] == "mlx_fused_lora" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_the_scanner_sees_relative_absolute_and_lazy_imports():
    assert {"layers"} <= imported_subpackages(PACKAGE / "csm" / "lora.py")  # from ..layers import
    assert {"adapters"} <= imported_subpackages(PACKAGE / "csm" / "__init__.py")
    source = "def f():\n    from ..csm import CSM\n    import mlx_fused_lora.train.loop\nfrom . import tree\n"
    assert imported_subpackages(PACKAGE / "layers" / "x.py", source) == {"csm", "train", "layers"}


@pytest.mark.parametrize("sub", ORDER)
def test_no_module_imports_upward(sub):
    above = set(ORDER[ORDER.index(sub) + 1 :]) | {"bench"}
    bad = {}
    for path in sorted((PACKAGE / sub).rglob("*.py")):
        wrong = imported_subpackages(path) & above
        if wrong:
            bad[str(path.relative_to(PACKAGE))] = sorted(wrong)
    assert not bad, f"{sub}/ imports packages above it: {bad}"


def test_no_package_module_imports_bench():
    bad = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.relative_to(PACKAGE).parts[0] != "bench" and "bench" in imported_subpackages(p)
    ]
    assert not bad, f"modules importing bench: {bad}"


def loaded_after_import(module: str) -> list[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "module, must_not_load",
    [
        ("mlx_fused_lora.adapters", ("mlx_fused_lora.csm", "mlx_fused_lora.train", "mlx_fused_lora.bench")),
        ("mlx_fused_lora.layers", ("mlx_fused_lora.adapters", "mlx_fused_lora.csm", "mlx_fused_lora.train")),
        ("mlx_fused_lora.csm", ("mlx_fused_lora.train", "mlx_fused_lora.bench")),
    ],
)
def test_importing_a_package_loads_nothing_above_it(module, must_not_load):
    loaded = loaded_after_import(module)
    assert module in loaded
    above = [m for m in loaded if m.startswith(must_not_load)]
    assert not above, f"importing {module} imported {above}"
