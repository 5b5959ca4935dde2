"""The package's house rules, read off the source: imports point one way and files stay small.

`ops <- layers <- adapters <- csm <- train`, with `bench` a leaf nothing in the package
imports (issue 9). Checked statically over every module, so a lazy import inside a
function counts as much as one at the top.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "mlx_fused_lora"
CSRC = PACKAGE.parents[1] / "csrc"
# Lower floors may not import higher ones. Top-level modules (cli, lm_lora, fast_blas, ...)
# are outside the ladder.
FLOORS = ["ops", "layers", "adapters", "csm", "train"]
# Entry points may reach bench: the CLI dispatcher, and the old module name kept as a
# re-export for one release.
BENCH_ENTRIES = {"cli.py", "benchmarking.py"}


def _room(module_parts):
    return module_parts[0] if module_parts and module_parts[0] in FLOORS + ["bench"] else None


def _imports(path):
    """(line, absolute module) for every import in the file, relative ones resolved."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mlx_fused_lora."):
                    yield node.lineno, alias.name.split(".")[1:]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
                names = [target + [a.name] for a in node.names] if not node.module else [target]
                yield from ((node.lineno, t) for t in names)
            elif node.module and node.module.startswith("mlx_fused_lora"):
                yield node.lineno, node.module.split(".")[1:]


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_imports_point_one_way():
    wrong = []
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        here = _room(rel.parts)
        for line, target in _imports(path):
            there = _room(target)
            if there is None or there == here:
                continue
            if there == "bench" and str(rel) not in BENCH_ENTRIES:
                wrong.append(f"{rel}:{line} imports bench (a leaf nothing in the package imports)")
            elif there != "bench" and here in FLOORS and FLOORS.index(there) > FLOORS.index(here):
                wrong.append(f"{rel}:{line} ({here}) imports {'.'.join(target)} ({there}, a floor above)")
    assert not wrong, "\n".join(wrong)


def test_importing_adapters_does_not_import_csm():
    code = "import sys, mlx_fused_lora.adapters; print([m for m in sys.modules if m.startswith('mlx_fused_lora.csm')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "paths, limit", [(lambda: _modules(), 400), (lambda: list(CSRC.rglob("*.cpp")) + list(CSRC.rglob("*.h")), 450)]
)
def test_files_stay_small(paths, limit):
    # "~400 lines" for Python, "~450" for C++: 10 % slack for the tilde.
    big = [
        f"{p.relative_to(PACKAGE.parents[1])}: {n}"
        for p in paths()
        if (n := len(p.read_text().splitlines())) > limit * 1.1
    ]
    assert not big, big


def test_each_python_module_says_its_job_first():
    silent = [
        str(p.relative_to(PACKAGE))
        for p in _modules()
        if p.stat().st_size and ast.get_docstring(ast.parse(p.read_text())) is None
    ]
    assert not silent, silent
