"""The GPU scripts (benchmarks/gpu_check.sh, gpu_check_quick.sh) name pytest node ids and ``-k`` expressions. On the
GPU machine a stale name makes pytest run nothing for that phase (the quick script named a GPU test renamed in
session 15), found only after the lease is spent. Here, without a GPU: every node id a script names exists, and
every ``-k`` expression selects at least one case of its own command's files and no CPU benchmark (pytest's own
expression grammar, matched as its ``-k`` matches: a case-insensitive substring of the test's name or of a folder /
file above it), and the configurations, variants and model the profile and precision scripts are given exist."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("benchmarks/gpu_check.sh", "benchmarks/gpu_check_quick.sh", "benchmarks/gpu_common.sh")


def _script_text(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read().replace("\\\n", " ")  # continuation lines joined: one command per line


def _pytest_commands(script: str):
    """(paths, -k expression or None) of each pytest call in ``script`` with literal paths (node ids kept whole)."""
    commands = []
    for line in _script_text(script).splitlines():
        if "-m pytest" not in line:
            continue
        args = shlex.split(re.split(r"\s(?:2>&1|\||>>|>)", line.split("-m pytest", 1)[1])[0])
        paths = [a for a in args if a.startswith(("tests", "benchmarks")) and "$" not in a]
        keyword = args[args.index("-k") + 1] if "-k" in args else None
        if paths:
            commands.append((paths, keyword))
    return commands


@pytest.fixture(scope="module")
def collected_ids():
    """The node ids pytest collects (here, without a GPU: the GPU cases are collected and skipped) from every path
    a script's pytest calls name: one collection for all of them."""
    paths = sorted({p.split("::")[0] for s in SCRIPTS for ps, _ in _pytest_commands(s) for p in ps})
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line]
    assert ids, out.stdout[-2000:] + out.stderr[-2000:]
    return ids


def _names(node_id: str):
    path, _, test = node_id.partition("::")
    return [p for p in path.split("/") if p] + [test]


def _under(node_id: str, path: str) -> bool:
    """Whether pytest run on ``path`` (a folder, a file or a node id) would collect ``node_id``."""
    if "::" in path:
        return node_id == path or node_id.startswith(path + "[")
    return node_id.startswith(path + "::" if path.endswith(".py") else path.rstrip("/") + "/")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_named_test_exists(script):
    for path, name in re.findall(r"(tests/[\w/]+\.py)::(\w+)", _script_text(script)):
        with open(os.path.join(ROOT, path)) as f:
            assert re.search(rf"^def {name}\(", f.read(), re.M), f"{script} names {path}::{name}, which is not there"
    for path in re.findall(r"\s((?:tests|benchmarks)/[\w/]+\.py)\b", _script_text(script)):
        assert os.path.isfile(os.path.join(ROOT, path)), f"{script} names {path}, which is not there"
    for paths, _ in _pytest_commands(script):  # folders too (tests/gpu)
        for path in paths:
            assert os.path.exists(os.path.join(ROOT, path.split("::")[0])), f"{script} names {path}, not there"


def test_every_keyword_expression_selects_gpu_cases_of_its_own_files(collected_ids):
    """Each ``-k`` (quoted or not: ``tests/gpu -k cext`` too) is matched against the cases of the files of its own
    command, as pytest's ``-k`` matches (a case-insensitive substring of the case's name or of a folder / file above
    it); it must select some, and no CPU benchmark (GPU time spent on a CPU row)."""
    from _pytest.mark.expression import Expression
    checked = 0
    for script in SCRIPTS:
        for paths, expr in _pytest_commands(script):
            if expr is None:
                continue
            ids = [i for i in collected_ids if any(_under(i, p) for p in paths)]
            compiled = Expression.compile(expr)
            chosen = [i for i in ids if compiled.evaluate(
                lambda sub, /, **kw: any(sub.lower() in n.lower() for n in _names(i)))]  # noqa: B023
            assert chosen, f"{script}: -k {expr!r} selects nothing in {paths}"
            cpu = [i for i in chosen if "::test_cpu_" in i]
            assert not cpu, f"{script}: -k {expr!r} selects CPU benchmarks: {cpu}"
            checked += 1
    assert checked >= 12


def test_every_node_id_and_path_collects_cases(collected_ids):
    """A file or node id a script runs collects at least one case (a renamed parametrised test still ``def``s)."""
    for script in SCRIPTS:
        for paths, _ in _pytest_commands(script):
            for path in paths:
                assert any(_under(i, path) for i in collected_ids), f"{script}: {path} collects nothing"


@pytest.mark.parametrize("script", SCRIPTS[:2])
def test_profile_step_configs_and_variants_exist(script, monkeypatch):
    """``profile_step.py --configs ... --variants ...``: each a GPU configuration and a variant the harness knows (a
    misspelt one ended the profile phase on the GPU after the profiles before it)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import profile_step
    calls = re.findall(r"profile_step\.py\s+--configs\s+(\S+)\s+--variants\s+(\S+)", _script_text(script))
    assert calls
    for configs, variants in calls:
        assert set(configs.split(",")) <= set(profile_step.GPU_CONFIGS), configs
        for variant in variants.split(","):
            assert profile_step.variant_problem(variant) is None, (script, variant)


def test_precision_check_names_a_registered_model():
    import unlearn_fast
    models = re.findall(r"precision_deviation\.py\s.*--model\s+(\S+)", _script_text("benchmarks/gpu_check.sh"))
    assert models and set(models) <= set(unlearn_fast.list_models()), models
