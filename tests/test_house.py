"""The package's house rules read off the source: small files, each saying its job first.

(Which way imports point is tests/test_import_direction.py's.)
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "mlx_fused_lora"
CSRC = PACKAGE.parents[1] / "csrc"


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


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
