# Shared by gpu_check.sh and gpu_check_quick.sh (sourced, not run): the results folder and log, the time
# budget and phase caps, the extension build with the toolchain facts, the extension's own tests, the summary.
# Set OUT_DEFAULT and BUDGET_DEFAULT (seconds) before sourcing; $OUT and $GPU_CHECK_BUDGET override them.
# Results go to $OUT only; the build and probes to a scratch folder of $TMPDIR, removed at the end.
set -u
OUT=${OUT:-$OUT_DEFAULT}
BUDGET=${GPU_CHECK_BUDGET:-$BUDGET_DEFAULT}  # seconds for the whole script; later phases shrink or are skipped
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then  # "540s" made every cap empty: every phase 'skipped (budget spent)'
  echo "GPU_CHECK_BUDGET must be a whole number of seconds (got '$BUDGET'), e.g. GPU_CHECK_BUDGET=540" >&2
  exit 2
fi
# absolute before the cd below: OUT=rel names a folder of the caller's working directory
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "cannot create the results folder OUT=$OUT" >&2; exit 2; }
# a previous run's results move to a folder of their own: a phase this run skips or loses must not show them
previous=()
for f in log.txt build.txt csrc.txt summary.txt precision.json bench_rows.jsonl bench_*.json profile*.txt \
    profile*.json; do
  for g in "$OUT"/$f; do [[ -f "$g" ]] && previous+=("$g"); done
done
if (( ${#previous[@]} )); then
  PREVIOUS_DIR=$OUT/previous-$(date +%Y%m%d-%H%M%S)
  mkdir -p "$PREVIOUS_DIR" && mv "${previous[@]}" "$PREVIOUS_DIR/"
fi
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/unlearn_fast_gpu_check.XXXXXX") \
  || { echo "cannot make a scratch folder in ${TMPDIR:-/tmp}" >&2; exit 2; }
trap 'rm -rf "$SCRATCH"' EXIT
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export UNLEARN_FAST_BENCH_ROWS=$OUT/bench_rows.jsonl  # each step benchmark's row as it ends (step_harness.py)
LOG=$OUT/log.txt
if [[ -n "${PREVIOUS_DIR:-}" ]]; then echo "a previous run's results: moved to $PREVIOUS_DIR" >>"$LOG"; fi
t0=$(date +%s)
phase() { echo "=== [$(( $(date +%s) - t0 ))s] $*" | tee -a "$LOG"; }
# limit CAP: the seconds a phase may take, at most CAP and what is left of the budget (0 = skip the phase)
limit() { local left=$(( BUDGET - ($(date +%s) - t0) - 5 )); if (( left < 15 )); then echo 0; elif (( left < $1 )); then echo "$left"; else echo "$1"; fi; }
# (every call of the scripts that can hang goes through it: past the device call's limit the tar after the script
# never runs and nothing comes back; -k: a process that ignores the TERM is killed 10 s later)
run_for() { local t; t=$(limit "$1"); shift; if (( t == 0 )); then echo "skipped (budget spent): $*" >>"$LOG"; return 1; fi; timeout -k 10 "$t" "$@"; }

# start_extension_build: the CPU + CUDA extension built in the background (niced) into a folder of its own, while
# the GPU tests run (they need no extension: its cases skip), so the build costs the budget nothing; the tests
# never see a half-written module. finish_extension_build CAP waits for it, copies the module in place and
# records the toolchain facts in $OUT/build.txt (tests/csrc crashed on the GPU image's error paths, 2026-11-27,
# and nowhere else: which compiler built it, which libstdc++ / libgcc_s / libgomp the process loads)
EXT_BUILD_DIR=$SCRATCH/ext_build
start_extension_build() {
  { echo "CXX=${CXX:-} CC=${CC:-} CUDA_HOME=${CUDA_HOME:-(unset: torch takes the nvcc on PATH, else /usr/local/cuda)}"
    command -v c++ g++ gcc nvcc; c++ --version 2>&1 | head -1
    /opt/gcc/bin/g++ --version 2>/dev/null | head -1; /usr/bin/g++ --version 2>/dev/null | head -1
  } >"$OUT/build.txt" 2>&1
  rm -rf "$EXT_BUILD_DIR" && mkdir -p "$EXT_BUILD_DIR"
  # a session of its own (setsid): a build cut at its cap is killed with every ninja / nvcc under it; first the
  # CUDA it builds against (no CUDA_HOME set here: torch derives it from the nvcc on PATH, which is right where that
  # nvcc is the toolkit's own and not a wrapper script elsewhere)
  UNLEARN_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=12 setsid nice -n 10 bash -c \
    'nvcc --version | tail -2
     python3 -c "from torch.utils.cpp_extension import CUDA_HOME as h; print(\"CUDA_HOME (torch):\", h)"
     python3 setup.py build_ext --build-lib "$1/lib" --build-temp "$1/tmp"; echo $? >"$1/rc"' _ "$EXT_BUILD_DIR" \
    >>"$OUT/build.txt" 2>&1 &
  EXT_BUILD_PID=$!
  EXT_BUILD_T0=$(date +%s)
}

finish_extension_build() {
  local t waited=0
  t=$(limit "$1")
  while kill -0 "$EXT_BUILD_PID" 2>/dev/null && (( waited < t )); do sleep 1; waited=$(( waited + 1 )); done
  if kill -0 "$EXT_BUILD_PID" 2>/dev/null; then
    kill -TERM -- "-$EXT_BUILD_PID" 2>/dev/null
    echo "BUILD CUT after $(( $(date +%s) - EXT_BUILD_T0 ))s (continuing with Triton / twin fallbacks)" | tee -a "$LOG"
  elif [[ "$(cat "$EXT_BUILD_DIR/rc" 2>/dev/null)" == 0 ]] && cp "$EXT_BUILD_DIR"/lib/unlearn_fast/_C*.so unlearn_fast/; then
    echo "extension built in $(( $(date +%s) - EXT_BUILD_T0 ))s (in the background)" >>"$LOG"
  else
    echo "BUILD FAILED (continuing with Triton / twin fallbacks; see build.txt)" | tee -a "$LOG"
  fi
  run_for 60 python3 -c "from unlearn_fast.kernels.extension import load_extension, extension_has_cuda; print('ext', load_extension() is not None, 'cuda', extension_has_cuda())" >>"$LOG" 2>&1
  { ldd unlearn_fast/_C*.so | grep -E "stdc|gcc_s|gomp"
    run_for 60 python3 -c "import torch, unlearn_fast._C; print(open('/proc/self/maps').read())" \
      | grep -E "libstdc|libgcc_s|libgomp" | awk '{print $6}' | sort -u; } >>"$OUT/build.txt" 2>&1
}

# the extension's own tests, one process per file, verbose and whole in $OUT/csrc.txt: a crash names its test
# and does not hide the files after it
extension_tests() {
  local f rc crashed=()
  run_for 40 python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/gpu -k cext 2>&1 | tail -8 >>"$LOG"
  for f in tests/csrc/test_*.py; do
    run_for 20 python3 -X faulthandler -m pytest -v -p no:cacheprovider "$f" >>"$OUT/csrc.txt" 2>&1
    rc=$?
    if (( rc != 0 )); then echo "$f: exit $rc (see csrc.txt)" >>"$LOG"; fi
    if (( rc > 128 )); then crashed+=("$f"); fi  # killed by a signal (139: segfault), not a failed assert
  done
  if (( ${#crashed[@]} )) && [[ -x /usr/bin/g++ ]]; then
    # the toolchain suspicion: rebuild the CPU sources with the system compiler in a copy (the CUDA build in
    # place stays for the benchmarks) and rerun the files that crashed
    echo "=== rebuilt with /usr/bin/g++ (CPU sources) in a copy: ${crashed[*]}" >>"$OUT/csrc.txt"
    local copy=$SCRATCH/sysgcc
    rm -rf "$copy" && cp -r . "$copy" && rm -f "$copy"/unlearn_fast/_C*.so
    ( cd "$copy" && CXX=/usr/bin/g++ CC=/usr/bin/gcc UNLEARN_FAST_CUDA=0 MAX_JOBS=16 \
        run_for 60 python3 setup.py build_ext --inplace >"$SCRATCH/sysgcc_build.txt" 2>&1 \
      || { echo "--- the rebuild failed; its last lines:"; tail -15 "$SCRATCH/sysgcc_build.txt"; false; } \
      && PYTHONPATH=$copy run_for 30 python3 -X faulthandler -m pytest -v -p no:cacheprovider "${crashed[@]}" ) \
      >>"$OUT/csrc.txt" 2>&1
    echo "system-g++ rebuild of the crashed files: exit $? (see csrc.txt)" >>"$LOG"
    exception_probe
  fi
}

# Does any C++ exception thrown in a module this image's compilers build kill the process? A pybind11 module of
# one throwing function, built with $CXX and with /usr/bin/g++ (no torch headers: seconds), each called once.
exception_probe() {
  local dir=$SCRATCH/exc_probe cxx rc inc suffix
  mkdir -p "$dir" && cat >"$dir/probe.cpp" <<'CPP'
#include <pybind11/pybind11.h>
#include <stdexcept>
PYBIND11_MODULE(probe, m) {
  m.def("value_error", [] { throw pybind11::value_error("probe"); });
  m.def("runtime_error", [] { throw std::runtime_error("probe"); });
}
CPP
  inc=$(run_for 30 python3 -c "import pybind11, sysconfig; print(pybind11.get_include(), sysconfig.get_paths()['include'])")
  suffix=$(run_for 30 python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  for cxx in "${CXX:-c++}" /usr/bin/g++; do
    rm -f "$dir"/probe*.so
    if run_for 30 "$cxx" -O2 -shared -fPIC -std=c++17 $(printf -- '-I%s ' $inc) "$dir/probe.cpp" \
        -o "$dir/probe$suffix" >>"$OUT/csrc.txt" 2>&1; then
      for fn in value_error runtime_error; do
        (cd "$dir" && run_for 10 python3 -c "import probe
try:
    probe.$fn()
except Exception as e:
    print(type(e).__name__)") >>"$OUT/csrc.txt" 2>&1
        rc=$?
        echo "exception probe: $($cxx --version | head -1) -> $fn: exit $rc" >>"$LOG"
      done
    else
      echo "exception probe: $cxx could not build the probe (see csrc.txt)" >>"$LOG"
    fi
  done
}

# the fused GroupNorm + swish, residual add + LayerNorm and residual add + pool at the models' shapes, against
# torch's ops (graph-replayed; each writes its JSON after every shape)
fused_op_profiles() {
  run_for 60 python3 benchmarks/profile_group_norm.py --out "$OUT/profile_group_norm.json" >/dev/null 2>>"$LOG" \
    || echo "group-norm profile failed" >>"$LOG"
  run_for 40 python3 benchmarks/profile_add_layer_norm.py --out "$OUT/profile_add_layer_norm.json" >/dev/null \
    2>>"$LOG" || echo "add + LayerNorm profile failed" >>"$LOG"
  run_for 30 python3 benchmarks/profile_residual_pool.py --out "$OUT/profile_residual_pool.json" >/dev/null \
    2>>"$LOG" || echo "residual pool profile failed" >>"$LOG"
}

summarize() {
  local files
  phase "summary"
  shopt -s nullglob; files=("$OUT"/bench_*.json); shopt -u nullglob  # none when every group was cut or skipped
  python3 benchmarks/summarize_bench.py "${files[@]}" "$UNLEARN_FAST_BENCH_ROWS" >"$OUT/summary.txt" 2>>"$LOG"
  cat "$OUT/summary.txt"
  phase "done"
}
