# Shared by gpu_check.sh and gpu_check_quick.sh (sourced, not run): the results folder and log, the time
# budget and phase caps, the extension build with the toolchain facts, the extension's own tests, the summary.
# Set OUT_DEFAULT and BUDGET_DEFAULT (seconds) before sourcing; $OUT and $GPU_CHECK_BUDGET override them.
set -u
OUT=${OUT:-$OUT_DEFAULT}
mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export UNLEARN_FAST_BENCH_ROWS=$OUT/bench_rows.jsonl  # each step benchmark's row as it ends (step_harness.py)
LOG=$OUT/log.txt
t0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-$BUDGET_DEFAULT}  # seconds for the whole script; later phases shrink or are skipped
phase() { echo "=== [$(( $(date +%s) - t0 ))s] $*" | tee -a "$LOG"; }
# limit CAP: the seconds a phase may take, at most CAP and what is left of the budget (0 = skip the phase)
limit() { local left=$(( BUDGET - ($(date +%s) - t0) - 5 )); if (( left < 15 )); then echo 0; elif (( left < $1 )); then echo "$left"; else echo "$1"; fi; }
run_for() { local t; t=$(limit "$1"); shift; if (( t == 0 )); then echo "skipped (budget spent): $*" >>"$LOG"; return 1; fi; timeout "$t" "$@"; }

# start_extension_build: the CPU + CUDA extension built in the background (niced) into a folder of its own, while
# the GPU tests run (they need no extension: its cases skip), so the build costs the budget nothing; the tests
# never see a half-written module. finish_extension_build CAP waits for it, copies the module in place and
# records the toolchain facts in $OUT/build.txt (tests/csrc crashed on the GPU image's error paths, 2026-11-27,
# and nowhere else: which compiler built it, which libstdc++ / libgcc_s / libgomp the process loads)
EXT_BUILD_DIR=/tmp/uf_ext_build
start_extension_build() {
  { echo "CXX=${CXX:-} CC=${CC:-}"; command -v c++ g++ gcc; c++ --version 2>&1 | head -1
    /opt/gcc/bin/g++ --version 2>/dev/null | head -1; /usr/bin/g++ --version 2>/dev/null | head -1
  } >"$OUT/build.txt" 2>&1
  rm -rf "$EXT_BUILD_DIR" && mkdir -p "$EXT_BUILD_DIR"
  # a session of its own (setsid): a build cut at its cap is killed with every ninja / nvcc under it
  UNLEARN_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=12 setsid nice -n 10 bash -c \
    'python3 setup.py build_ext --build-lib "$1/lib" --build-temp "$1/tmp"; echo $? >"$1/rc"' _ "$EXT_BUILD_DIR" \
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
  python3 -c "from unlearn_fast.kernels.extension import load_extension, extension_has_cuda; print('ext', load_extension() is not None, 'cuda', extension_has_cuda())" >>"$LOG" 2>&1
  { ldd unlearn_fast/_C*.so | grep -E "stdc|gcc_s|gomp"
    python3 -c "import torch, unlearn_fast._C; print(open('/proc/self/maps').read())" | grep -E "libstdc|libgcc_s|libgomp" \
      | awk '{print $6}' | sort -u; } >>"$OUT/build.txt" 2>&1
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
    rm -rf /tmp/uf_sysgcc && cp -r . /tmp/uf_sysgcc && rm -f /tmp/uf_sysgcc/unlearn_fast/_C*.so
    ( cd /tmp/uf_sysgcc && CXX=/usr/bin/g++ CC=/usr/bin/gcc UNLEARN_FAST_CUDA=0 MAX_JOBS=16 \
        run_for 60 python3 setup.py build_ext --inplace >/tmp/uf_sysgcc_build.txt 2>&1 \
      || { echo "--- the rebuild failed; its last lines:"; tail -15 /tmp/uf_sysgcc_build.txt; false; } \
      && PYTHONPATH=/tmp/uf_sysgcc run_for 30 python3 -X faulthandler -m pytest -v -p no:cacheprovider "${crashed[@]}" ) \
      >>"$OUT/csrc.txt" 2>&1
    echo "system-g++ rebuild of the crashed files: exit $? (see csrc.txt)" >>"$LOG"
    exception_probe
  fi
}

# Does any C++ exception thrown in a module this image's compilers build kill the process? A pybind11 module of
# one throwing function, built with $CXX and with /usr/bin/g++ (no torch headers: seconds), each called once.
exception_probe() {
  local dir=/tmp/uf_exc_probe cxx rc inc
  mkdir -p "$dir" && cat >"$dir/probe.cpp" <<'CPP'
#include <pybind11/pybind11.h>
#include <stdexcept>
PYBIND11_MODULE(probe, m) {
  m.def("value_error", [] { throw pybind11::value_error("probe"); });
  m.def("runtime_error", [] { throw std::runtime_error("probe"); });
}
CPP
  inc=$(python3 -c "import pybind11, sysconfig; print(pybind11.get_include(), sysconfig.get_paths()['include'])")
  for cxx in "${CXX:-c++}" /usr/bin/g++; do
    rm -f "$dir"/probe*.so
    if run_for 30 "$cxx" -O2 -shared -fPIC -std=c++17 $(printf -- '-I%s ' $inc) "$dir/probe.cpp" \
        -o "$dir/probe$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")" >>"$OUT/csrc.txt" 2>&1; then
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
  phase "summary"
  python3 benchmarks/summarize_bench.py "$OUT"/bench_*.json "$UNLEARN_FAST_BENCH_ROWS" >"$OUT/summary.txt" 2>>"$LOG"
  cat "$OUT/summary.txt"
  phase "done"
}
