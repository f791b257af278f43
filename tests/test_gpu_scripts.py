"""The GPU scripts (benchmarks/gpu_check.sh, gpu_check_quick.sh) name pytest node ids and ``-k`` expressions. On the
GPU machine a stale name makes pytest run nothing for that phase (the quick script named a GPU test renamed in
session 15), found only after the lease is spent. Here, without a GPU: every node id a script names exists, and
every ``-k`` expression selects at least one benchmark (pytest's own expression grammar, matched as its ``-k``
matches: a case-insensitive substring of the test's name or of a folder / file above it)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("benchmarks/gpu_check.sh", "benchmarks/gpu_check_quick.sh", "benchmarks/gpu_common.sh")


def _script_text(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read().replace("\\\n", " ")  # continuation lines joined: one command per line


def _benchmark_ids():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "benchmarks"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line]
    assert ids, out.stdout[-2000:] + out.stderr[-2000:]
    return ids


def _names(node_id: str):
    path, _, test = node_id.partition("::")
    return [p for p in path.split("/") if p] + [test]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_named_test_exists(script):
    for path, name in re.findall(r"(tests/[\w/]+\.py)::(\w+)", _script_text(script)):
        with open(os.path.join(ROOT, path)) as f:
            assert re.search(rf"^def {name}\(", f.read(), re.M), f"{script} names {path}::{name}, which is not there"
    for path in re.findall(r"\s((?:tests|benchmarks)/[\w/]+\.py)\b", _script_text(script)):
        assert os.path.isfile(os.path.join(ROOT, path)), f"{script} names {path}, which is not there"


def test_every_keyword_expression_selects_a_benchmark():
    from _pytest.mark.expression import Expression
    ids = _benchmark_ids()
    expressions = [(script, expr) for script in SCRIPTS for expr in re.findall(r'-k "([^"]+)"', _script_text(script))]
    assert len(expressions) >= 9
    for script, expr in expressions:
        compiled = Expression.compile(expr)
        chosen = [i for i in ids if compiled.evaluate(
            lambda sub, /, **kw: any(sub.lower() in n.lower() for n in _names(i)))]
        assert chosen, f"{script}: -k {expr!r} selects no benchmark"
