"""The GPU check scripts (benchmarks/gpu_check.sh, gpu_check_quick.sh + gpu_common.sh) dry-run without a GPU, and
the benchmark tools on this CPU machine.

The next GPU session has one call of at most ~590 s; a script that overruns it returns nothing (the tar after it
never runs). Here each script runs in a copy of the benchmarks folder with shims on PATH: ``python3`` and
``nvidia-smi`` record their arguments and fail, ``timeout`` advances a fake clock (``date +%s``) by what each call
"costs", so the budget logic, the phase order, the summary and the files written are checked in about a second."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
SCRIPTS = ("gpu_check.sh", "gpu_check_quick.sh")
T0 = 1_000_000  # the fake clock's start

_SHIMS = {
    # date +%s reads the fake clock; any other format is the real date
    "date": '#!/bin/bash\nif [[ "$1" == "+%s" ]]; then cat "$FAKE/clock"; else exec /bin/date "$@"; fi\n',
    # timeout [-k N | --kill-after=N | -s SIG] T CMD...: a call costs FAKE_COST seconds of the fake clock; over T
    # it is cut (the clock moves T on, exit 124) without running
    "timeout": r'''#!/bin/bash
while [[ "$1" == -* ]]; do case "$1" in -k|-s) shift 2;; *) shift;; esac; done
t=$1; shift
cost=${FAKE_COST:-0}
now=$(cat "$FAKE/clock")
if (( cost > t )); then
  echo $(( now + t )) > "$FAKE/clock"; echo "CUT t=$(( now - T0 )) cap=$t $*" >> "$FAKE/calls"; exit 124
fi
echo $(( now + cost )) > "$FAKE/clock"; echo "RAN t=$(( now - T0 )) cap=$t $*" >> "$FAKE/calls"
FAKE_BOUNDED=1 exec "$@"
''',
    # python3: the summary is the real one; every other call records itself (bounded by a timeout or not, and
    # the CUDA_HOME it would build with) and fails (FAKE_RC), a tests/csrc file with FAKE_CSRC_RC
    "python3": r'''#!/bin/bash
echo "python3 ${FAKE_BOUNDED:+bounded}${FAKE_BOUNDED:-UNBOUNDED} CUDA_HOME=${CUDA_HOME:-unset} $*" >> "$FAKE/calls"
if [[ "$1" == benchmarks/summarize_bench.py ]]; then exec "$REAL_PY" "$@"; fi
if [[ "$*" == *tests/csrc/* && -n "${FAKE_CSRC_RC:-}" ]]; then exit "$FAKE_CSRC_RC"; fi
exit ${FAKE_RC:-1}
''',
    "nvidia-smi": '#!/bin/bash\necho "nvidia-smi ${FAKE_BOUNDED:+bounded}${FAKE_BOUNDED:-UNBOUNDED}" >> "$FAKE/calls"\n'
                  'echo "FAKE H100, 81559 MiB"\n',
    "nvcc": '#!/bin/bash\necho "Cuda compilation tools, release 0.0 (fake)"\n',
}


def _fake_env(tmp_path):
    """A copy of the repository's script side (benchmarks/*.sh, summarize_bench.py, two tests/csrc files) under
    ``tmp_path/repo`` and the shims under ``tmp_path/bin`` (made once); returns (repo, env)."""
    repo, bin_dir, scratch = tmp_path / "repo", tmp_path / "bin", tmp_path / "scratch"
    if not repo.exists():
        (repo / "benchmarks").mkdir(parents=True)
        for name in os.listdir(BENCH):
            if name.endswith(".sh") or name == "summarize_bench.py":
                shutil.copy(os.path.join(BENCH, name), repo / "benchmarks" / name)
        (repo / "tests" / "csrc").mkdir(parents=True)
        for name in ("test_ext_a.py", "test_ext_b.py"):
            (repo / "tests" / "csrc" / name).write_text("")
        (repo / "unlearn_fast").mkdir()
        bin_dir.mkdir()
        for name, text in _SHIMS.items():
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        (tmp_path / "clock").write_text(f"{T0}\n")
        (tmp_path / "calls").write_text("")
        scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE", "GPU_CHECK", "CUDA_HOME", "OUT"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE=str(tmp_path), T0=str(T0), REAL_PY=sys.executable,
               TMPDIR=str(scratch))
    return repo, env


def _run(tmp_path, script, out=None, **fake):
    """Run ``script`` of the fake repository from ``tmp_path``; returns (completed process, out folder, calls)."""
    repo, env = _fake_env(tmp_path)
    out = out if out is not None else str(tmp_path / "out")
    env.update({k: str(v) for k, v in fake.items()}, OUT=out)
    p = subprocess.run(["bash", str(repo / "benchmarks" / script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    return p, out, (tmp_path / "calls").read_text().splitlines()


def _outputs_named(script):
    """The result files a script's phases name (--benchmark-json= / --out), in the order they run (the shared
    functions of gpu_common.sh expanded where the script calls them)."""
    with open(os.path.join(BENCH, "gpu_common.sh")) as f:
        functions = dict(re.findall(r"^(\w+)\(\) \{\n(.*?)^\}", f.read(), re.M | re.S))
    with open(os.path.join(BENCH, script)) as f:
        text = "\n".join(functions.get(line.strip(), line) for line in f.read().splitlines())
    return re.findall(r'(?:--benchmark-json=|--out )"\$OUT/([\w.]+)"', text)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_phase_runs_when_every_call_fails(tmp_path, script):
    """Every python call failing at once (no GPU, no torch): each phase is still tried, and the summary written."""
    p, out, calls = _run(tmp_path, script, GPU_CHECK_BUDGET=540)
    assert p.returncode == 0, p.stderr
    tried = "\n".join(c for c in calls if c.startswith("RAN "))
    named = _outputs_named(script)
    assert len(named) >= 6
    for name in named:
        assert f"/{name}" in tried, f"{script}: the phase writing {name} was not run after the earlier ones failed"
    for name in ("test_ext_a.py", "test_ext_b.py"):
        assert f"tests/csrc/{name}" in tried
    log = open(os.path.join(out, "log.txt")).read()
    assert "] done" in log and os.path.isfile(os.path.join(out, "summary.txt"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_budget_cuts_the_last_phases_and_still_writes_the_summary(tmp_path, script):
    """Every call taking longer than its cap: the phases run in order until the budget is spent, every one after
    is skipped (none runs again after the first skip), nothing runs past the budget, and the summary is written."""
    budget = 540
    p, out, calls = _run(tmp_path, script, GPU_CHECK_BUDGET=budget, FAKE_COST=10 ** 6)
    assert p.returncode == 0, p.stderr
    log = open(os.path.join(out, "log.txt")).read()
    ran = [c for c in calls if c.startswith(("RAN ", "CUT "))]
    skipped = [line for line in log.splitlines() if line.startswith("skipped (budget spent)")]
    assert ran and skipped, (ran, skipped)
    ends = [int(m.group(1)) + int(m.group(2)) for m in (re.search(r"t=(\d+) cap=(\d+)", c) for c in ran)]
    assert max(ends) <= budget, f"{script}: a phase ran past the budget: {max(ends)} s"
    # the phases that ran are the first ones in the script's order, the skipped ones all the rest
    named = _outputs_named(script)
    first_skip = min(i for i, n in enumerate(named) if any(f"/{n}" in s for s in skipped))
    for i, n in enumerate(named):
        ran_it = any(f"/{n}" in c for c in ran)
        assert ran_it == (i < first_skip), f"{script}: {n} ran={ran_it}, the first phase skipped: {named[first_skip]}"
    assert any("/bench_gpu.json" in c or "/bench_mage.json" in c for c in ran)  # the first benchmark group ran
    assert "] done" in log and os.path.isfile(os.path.join(out, "summary.txt"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_call_is_bounded_by_a_timeout(tmp_path, script):
    """A python (or nvidia-smi) call outside ``timeout`` that hangs runs the script past the device call's limit, and
    then the tar after it never runs: nothing comes back. Only the background build (killed at its cap by
    finish_extension_build) and the summary (JSON only, no torch) may run unbounded."""
    _, _, calls = _run(tmp_path, script, GPU_CHECK_BUDGET=540, FAKE_CSRC_RC=139)  # 139: the crash path too
    unbounded = [c for c in calls if " UNBOUNDED" in c or c == "nvidia-smi UNBOUNDED"]
    allowed = ("setup.py build_ext --build-lib", "benchmarks/summarize_bench.py", "torch.utils.cpp_extension")
    bad = [c for c in unbounded if not any(a in c for a in allowed)]
    assert not bad, f"{script}: calls with no time limit:\n" + "\n".join(bad)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_relative_out_folder_is_where_the_results_go(tmp_path, script):
    """``OUT=rel`` names a folder of the caller's working directory (the script changes to the repository root)."""
    p, _, _ = _run(tmp_path, script, out="rel_out", GPU_CHECK_BUDGET=60)
    assert p.returncode == 0, p.stderr
    assert os.path.isfile(tmp_path / "rel_out" / "log.txt"), p.stderr[-2000:]
    assert os.path.isfile(tmp_path / "rel_out" / "summary.txt")
    assert not (tmp_path / "repo" / "rel_out").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_results_go_under_out_and_scratch_under_tmpdir(tmp_path, script):
    """Nothing is written into the repository (no extension was built) and nothing to fixed /tmp paths: the build,
    the system-g++ copy and the exception probe live in a folder of $TMPDIR, removed at the end."""
    repo, _ = _fake_env(tmp_path)
    before = {os.path.join(d, f) for d, _, fs in os.walk(repo) for f in fs}
    _, out, calls = _run(tmp_path, script, GPU_CHECK_BUDGET=540, FAKE_CSRC_RC=139)
    after = {os.path.join(d, f) for d, _, fs in os.walk(repo) for f in fs}
    assert after == before, sorted(after - before)
    build = [c for c in calls if "setup.py build_ext --build-lib" in c]
    assert build and all(str(tmp_path / "scratch") in c for c in build), build
    assert "/tmp/uf_" not in "\n".join(calls) + open(os.path.join(BENCH, "gpu_common.sh")).read()
    assert os.listdir(tmp_path / "scratch") == [], "the scratch folder was left behind"
    assert "CUDA_HOME=unset" in build[0]  # torch finds it from the nvcc on PATH; the script sets none


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_previous_runs_results_do_not_enter_this_runs_summary(tmp_path, script):
    """The same OUT twice (the default OUT is a fixed folder): a phase this run skips or loses must not show the last
    run's figures as this run's; the earlier files are kept, moved to a folder of their own."""
    out = tmp_path / "out"
    out.mkdir()
    old = {"benchmarks": [{"name": "test_gpu_step_teacher_not_overlapped[old]", "stats": {"median": 0.5},
                           "extra_info": {}}]}
    (out / "bench_serial.json").write_text(json.dumps(old))
    (out / "bench_rows.jsonl").write_text(json.dumps({"name": "test_old_row", "median_s": 0.1,
                                                      "extra_info": {}}) + "\n")
    (out / "notes.md").write_text("mine")
    p, _, _ = _run(tmp_path, script, GPU_CHECK_BUDGET=540)
    assert p.returncode == 0, p.stderr
    summary = (out / "summary.txt").read_text()
    assert "old" not in summary, summary
    kept = [d for d in os.listdir(out) if d.startswith("previous")]
    assert len(kept) == 1 and {"bench_serial.json", "bench_rows.jsonl"} <= set(os.listdir(out / kept[0]))
    assert (out / "notes.md").read_text() == "mine"  # not a result file: left alone


@pytest.mark.parametrize("budget", ["540s", "", "-5"])
def test_a_budget_that_is_not_whole_seconds_is_refused_in_one_line(tmp_path, budget):
    """``GPU_CHECK_BUDGET=540s`` made every phase's cap empty, i.e. every phase 'skipped (budget spent)'."""
    p, _, calls = _run(tmp_path, "gpu_check.sh", GPU_CHECK_BUDGET=budget)
    if budget == "":  # empty = unset: the default budget
        assert p.returncode == 0
        return
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "GPU_CHECK_BUDGET" in p.stderr, p.stderr
    assert not [c for c in calls if c.startswith(("RAN", "python3"))]


# ---- summarize_bench.py on a partial run ----

def _summary(tmp_path, *files):
    p = subprocess.run([sys.executable, os.path.join(BENCH, "summarize_bench.py"), *map(str, files)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    return p.stdout


def _row(name, config, variant, median_s):
    return {"name": name, "median_s": median_s,
            "extra_info": {"config": config, "variant": variant, "speedup_vs_reference": 2.0,
                           "images_per_s": 64 / median_s, "peak_memory_mb": 100.0, "device": "H100"}}


def test_summary_keeps_the_rows_before_a_line_cut_mid_write(tmp_path):
    """A run killed while appending a row leaves a half line: the rows before it are still listed and count for the
    A/B lines; the cut line is named, not a reason to drop the whole file."""
    rows = tmp_path / "bench_rows.jsonl"
    rows.write_text(json.dumps(_row("test_gpu_step_fast_bf16[gpu_mae_large]", "gpu_mae_large", "fast_bf16", 0.030))
                    + "\n" + json.dumps(_row("test_gpu_step_mae_variants[gpu_mae_large-fast_bf16_half_student]",
                                             "gpu_mae_large", "fast_bf16_half_student", 0.028)) + "\n"
                    + '{"name": "test_gpu_step_mae_var')
    text = _summary(tmp_path, tmp_path / "bench_gpu.json", rows)
    assert "test_gpu_step_fast_bf16[gpu_mae_large]" in text and "fast_bf16_half_student" in text
    assert "x1.071" in text  # 30 ms / 28 ms: the A/B line from the recorded rows
    assert re.search(r"1 unreadable line", text), text


def test_summary_of_a_group_cut_before_its_json_was_written(tmp_path):
    """pytest-benchmark opens its --benchmark-json file when the session starts and fills it at the end: a group cut
    by its cap leaves an empty file. One line names it; the other files' rows are all there."""
    (tmp_path / "bench_gpu.json").write_text(json.dumps({"benchmarks": [
        {"name": "test_gpu_step_fast[gpu_mae_base]", "stats": {"median": 0.027},
         "extra_info": {"config": "gpu_mae_base", "variant": "fast", "images_per_s": 2370.0}}]}))
    (tmp_path / "bench_serial.json").write_text("")
    text = _summary(tmp_path, tmp_path / "bench_gpu.json", tmp_path / "bench_serial.json",
                    tmp_path / "bench_rows.jsonl")
    assert "test_gpu_step_fast[gpu_mae_base]" in text
    assert sum("bench_serial.json" in line for line in text.splitlines()) == 1


# ---- the GPU-only tools on this CPU machine: one line, a non-zero exit, no traceback ----

GPU_ONLY = ("profile_step.py --out {out}", "profile_loss_noise.py --out {out}", "profile_group_norm.py --out {out}",
            "profile_add_layer_norm.py --out {out}", "profile_residual_pool.py --out {out}",
            "precision_deviation.py --device cuda --model mae_micro --out {out}")


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)


@pytest.mark.parametrize("command", GPU_ONLY)
def test_gpu_only_tools_say_so_in_one_line_and_fail_without_a_gpu(tmp_path, bench_modules, capsys, command):
    import importlib
    script, *args = command.format(out=tmp_path / "out.txt").split()
    module = importlib.import_module(script[:-3])
    assert module.main(args) != 0
    err = capsys.readouterr()
    lines = [line for line in (err.out + err.err).splitlines() if line.strip()]
    assert len(lines) == 1 and "GPU" in lines[0], lines
    assert not os.path.exists(tmp_path / "out.txt")


@pytest.mark.parametrize("args, says", [
    (["--model", "mae_vit_bse_patch16"], "mae_vit_base_patch16"),  # a misspelt model: the registered names
    (["--steps", "0"], "--steps"),
])
def test_precision_deviation_bad_arguments_are_one_line(bench_modules, capsys, args, says):
    import precision_deviation
    with pytest.raises(SystemExit) as e:
        precision_deviation.main(["--device", "cpu", *args])
    assert e.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["--variants", "fast_bf16_halfstudent"], "halfstudent"),
    (["--variants", "refrence"], "refrence"),
    (["--configs", "gpu_mae_huge"], "gpu_mae_huge"),
])
def test_profile_step_names_a_bad_variant_or_config_before_anything_runs(tmp_path, bench_modules, capsys, args, says):
    """A misspelt variant on the GPU raised from inside the profile loop after the earlier profiles (or, for a word
    without "fast", silently profiled the reference step under that name)."""
    import profile_step
    with pytest.raises(SystemExit) as e:
        profile_step.main(["--out", str(tmp_path / "p.txt"), *args])
    assert e.value.code == 2
    assert says in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "p.txt")


# ---- a step row's peak memory ----

def _rss_mb(field="VmRSS"):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux /proc only")
def test_a_rows_peak_memory_is_its_variants_not_the_reference_timed_before_it(bench_modules, monkeypatch):
    """``_bench`` times the configuration's reference step first (once per process) and the row's variant after; the
    peak window was opened before the reference, so a group whose first row is a variant reported the reference's
    peak (run 3: ``mage_variants[fast_shared]`` 21427 MB = the MAGE-B reference's 21483 MB; its fast_bf16 rows
    8.5-11 GB), and on the CPU every row's peak memory was NaN."""
    import torch

    import bench_unlearn_step as bench

    def reference_then_free(cfg, steps, warmup):  # the reference's own peak: 400 MB more than the variant's
        x = torch.ones(100 * 2 ** 20)
        del x
        return 1.0
    monkeypatch.setattr(bench, "reference_seconds", reference_then_free)
    monkeypatch.setattr(bench, "make_runner", lambda cfg, variant: (lambda step: None))
    monkeypatch.setattr(bench, "benchmark_steps", lambda benchmark, run, device, steps, warmup: 0.5)
    row = type("Row", (), {"extra_info": {}, "name": "row"})()
    baseline = _rss_mb()
    bench._bench(row, bench.CPU_CONFIGS["cpu_mae_micro"], "fast", 1, 0)
    peak = row.extra_info["peak_memory_mb"]
    assert baseline / 2 < peak < baseline + 200, (baseline, peak)
    assert row.extra_info["peak_memory_of"]
