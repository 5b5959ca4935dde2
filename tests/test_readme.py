"""The README runs, and its figures are the committed results files' figures.

Conventions for README.md (every section follows them; this file parses whatever is there):

1. Python blocks (```python) are executed, each on its own, in a fresh namespace and an
   empty temporary directory: make each block self-contained.
2. Shell blocks (```bash, ```sh, ```shell): each command line (``\\`` continuations joined)
   runs with ``bash -e -c`` in an empty temporary directory shared by the block's lines, in
   order, and must exit 0. Two ways out, each visible in the README's source:
   - a line whose comment says ``# not run by tests: <why>`` is skipped (e.g. it installs,
     downloads a real checkpoint, or is the test suite itself);
   - ``<!-- tested-by: tests/test_x.py (what) -->`` just before a block hands the block to
     that test file, which must contain the marker's text and read the block by it: the way
     to run a slow command with small arguments appended (argparse keeps the last value of
     a repeated flag), so the README shows the real command and the test takes seconds.
3. Figures: ``VALUE<!-- figure: FILE KEY -->`` (the number just before the marker, no space;
   units go after the marker: ``47<!-- figure: ... --> s``). FILE is a JSON file relative to
   the repository root (``benchmarks/results/*.json``); KEY is a dot path: names, list
   indices (``runs.0.total_s``), ``name[field=value,...]`` for the one element of list
   ``name`` whose fields match (``ratios[m=2048,pass_name=forward,dropout=0.1]``), and
   ``KEY1 / KEY2`` for a ratio of two values, ``min(KEY)``, ``max(KEY)`` or ``median(KEY)``
   over a KEY with ``*`` for every element of a list (``max(runs.*.total_s)``). The shown
   number must equal the value rounded to the decimals shown.
4. ``<!-- output: FILE KEY -->`` just before a fenced block: the block's text is the string
   at KEY (a printed table the results file keeps verbatim); ``<!-- output: FILE -->``: the
   block is the text file FILE (a committed sample file).
5. In every ``##`` section, every ratio figure (a number with ``×`` right after it) carries a
   figure marker, but for the phrases of `NOT_RESULTS` (figures that are no measurement of
   this package, each with its reason).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

# ratio figures that are no measurement of this package, so they name no results file
NOT_RESULTS = {
    "~4× more per two characters": "the growth of a regex's backtracking (PEFT's), not a result of ours",
}
SKIP_COMMENT = "not run by tests:"

BLOCK = re.compile(
    r"(?:<!--\s*(?P<marker>[^>]*?)\s*-->\s*\n)?^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```", re.M | re.S
)
FIGURE = re.compile(r"(?P<value>-?\d+(?:\.\d+)?)<!--\s*figure:\s*(?P<file>\S+)\s+(?P<key>[^>]*?)\s*-->")


def line_of(pos: int) -> int:
    return README.count("\n", 0, pos) + 1


def blocks(langs: tuple[str, ...]) -> list:
    """The README's fenced blocks in ``langs``; ids name the line and the block's first words."""
    params = []
    for m in BLOCK.finditer(README):
        if m.group("lang") in langs:
            words = re.sub(r"[^\w.-]+", "-", " ".join(m.group("body").split()[:3])).strip("-")
            params.append(
                pytest.param(m.group("body"), m.group("marker") or "", id=f"line{line_of(m.start('body'))}-{words}")
            )
    return params


def shell_lines(body: str) -> list[str]:
    text = body.replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


AGGREGATES = {"min": min, "max": max, "median": statistics.median}


def resolve(data, key: str):
    """The value at ``key`` (see the module docstring) in parsed JSON ``data``."""
    if "/" in key:
        num, den = (resolve(data, k.strip()) for k in key.split("/"))
        return num / den
    if m := re.fullmatch(r"(\w+)\((.*)\)", key.strip()):
        assert m.group(1) in AGGREGATES, f"unknown aggregate {m.group(1)}: use one of {sorted(AGGREGATES)}"
        return AGGREGATES[m.group(1)](values(data, m.group(2)))
    (value,) = values(data, key)
    return value


def values(data, key: str) -> list:
    """Every value at ``key``; a ``*`` part stands for each element of a list."""
    found = [data]
    for part in re.findall(r"[^.\[]+(?:\[[^\]]*\])?", key.strip()):
        name, _, selector = part.partition("[")
        if name == "*":
            found = [e for v in found for e in (v if isinstance(v, list) else v.values())]
        elif name:
            found = [v[int(name)] if isinstance(v, list) else v[name] for v in found]
        if selector:
            wanted = dict(kv.split("=", 1) for kv in selector.rstrip("]").split(","))
            picked = []
            for v in found:
                matches = [e for e in v if all(_same(e.get(k), w) for k, w in wanted.items())]
                assert len(matches) == 1, f"{part}: {len(matches)} elements match {wanted}"
                picked.append(matches[0])
            found = picked
    return found


def _same(actual, wanted: str) -> bool:
    if isinstance(actual, (int, float)) and not isinstance(actual, bool):
        try:
            return float(wanted) == actual
        except ValueError:
            return False
    return str(actual) == wanted


def run_env() -> dict:
    env = dict(os.environ)
    # the console scripts of this Python first, whatever PATH the test runner has
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.parametrize("body, marker", blocks(("python",)))
def test_python_blocks_run(body, marker, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(body, "README.md", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("body, marker", blocks(("bash", "sh", "shell")))
def test_shell_blocks_run(body, marker, tmp_path):
    if marker.startswith("tested-by:"):
        test_file = marker.split(":", 1)[1].split()[0]
        assert marker in (REPO / test_file).read_text(), f"{test_file} does not read the block marked <!-- {marker} -->"
        return
    ran = 0
    for line in shell_lines(body):
        comment = re.search(r"\s#\s.*$", line)
        if comment and SKIP_COMMENT in comment.group(0):
            why = comment.group(0).split(SKIP_COMMENT, 1)[1].strip()
            assert why, f"say why it is not run: {line}"
            continue
        command = line[: comment.start()] if comment else line
        r = subprocess.run(
            ["bash", "-e", "-c", command], cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, (
            f"README command failed ({r.returncode}): {command}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
        ran += 1
    if not ran:
        pytest.skip("every line of this block says why it is not run")


FIGURES = [
    pytest.param(m.group("value"), m.group("file"), m.group("key"), id=f"line{line_of(m.start())}")
    for m in FIGURE.finditer(README)
]


@pytest.mark.skipif(not FIGURES, reason="no figure markers in the README")
@pytest.mark.parametrize("shown, file, key", FIGURES)
def test_figures_match_their_results_files(shown, file, key):
    value = resolve(json.loads((REPO / file).read_text()), key)
    assert shows(shown, value), f"README shows {shown}, {file} {key} is {value}"


def shows(shown: str, value: float) -> bool:
    """Whether the text ``shown`` is ``value`` rounded to the decimals ``shown`` has."""
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return f"{value:.{decimals}f}" == shown


OUTPUTS = [
    pytest.param(m.group("marker").split()[1:], m.group("body"), id=f"line{line_of(m.start('body'))}")
    for m in BLOCK.finditer(README)
    if (m.group("marker") or "").startswith("output:")
]


@pytest.mark.skipif(not OUTPUTS, reason="no output markers in the README")
@pytest.mark.parametrize("source, body", OUTPUTS)
def test_output_blocks_are_their_files(source, body):
    file, key = source[0], " ".join(source[1:])
    text = (REPO / file).read_text()
    expected = resolve(json.loads(text), key) if key else text
    assert body.strip("\n") == expected.strip("\n"), f"the block differs from {file} {key}"


def section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert m, f"README has no section '## {title}'"
    return m.group(1)


@pytest.mark.parametrize("title", re.findall(r"^## (.+)$", README, re.M))
def test_every_ratio_figure_names_its_results_file(title):
    prose = " ".join(BLOCK.sub("", section(title)).split())  # code blocks are checked as outputs
    for phrase in NOT_RESULTS:
        prose = prose.replace(phrase, "")
    unmarked = re.findall(r"\d+(?:\.\d+)?×", prose)  # a marked one reads 2.35<!-- figure: ... -->×
    assert not unmarked, f"figures in '{title}' without a <!-- figure: FILE KEY --> marker: {unmarked}"


def test_figure_keys_resolve_and_figures_compare_as_documented():
    data = {"runs": [{"t": 2.0, "k": "a"}, {"t": 4.0, "k": "b"}, {"t": 9.0, "k": "c"}], "n": 3}
    assert resolve(data, "runs.1.t") == 4.0 and resolve(data, "runs[k=c].t") == 9.0
    assert resolve(data, "runs.2.t / runs.0.t") == 4.5 and resolve(data, "n") == 3
    assert (resolve(data, "min(runs.*.t)"), resolve(data, "max(runs.*.t)"), resolve(data, "median(runs.*.t)")) == (
        2,
        9,
        4,
    )
    with pytest.raises(AssertionError, match="0 elements match"):
        resolve(data, "runs[k=z].t")
    with pytest.raises(AssertionError, match="unknown aggregate"):
        resolve(data, "mean(runs.*.t)")
    assert shows("2.21", 2.2055) and shows("220", 220.157) and shows("0.92", 0.9202)
    assert not shows("2.20", 2.2055) and not shows("2.2", 2.26) and not shows("47", 220.1)
