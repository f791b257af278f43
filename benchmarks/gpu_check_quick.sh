#!/usr/bin/env bash
# The short GPU check for a lease with little time left (about 5 minutes): build the extension, the GPU tests
# of the fast path's newest parts, the MAGE step benchmarks (fused vs unfused tokenizer norms), the bf16 step
# profiles, then the torch.compile baseline of MAE-B if time is left. Results under $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_check_quick.sh
# Files (8, the device tool's limit): log.txt, build.txt (toolchain facts + build log), csrc.txt, bench_mage.json, bench_compiled.json, profile_step.txt/.json, summary.txt
set -u
OUT=${OUT:-/tmp/unlearn_fast_gpu_check_quick}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
t0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-320}  # seconds for the whole script: the compile phase gets what is left
phase() { echo "=== [$(( $(date +%s) - t0 ))s] $*" | tee -a "$LOG"; }

# compiler and C++ runtime facts: tests/csrc crashed on this image's error paths (2026-11-27), not elsewhere
{ echo "CXX=${CXX:-} CC=${CC:-}"; command -v c++ g++ gcc; c++ --version 2>&1 | head -1
  /opt/gcc/bin/g++ --version 2>/dev/null | head -1; /usr/bin/g++ --version 2>/dev/null | head -1
} >"$OUT/build.txt" 2>&1
phase "build extension"
UNLEARN_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 120 python3 setup.py build_ext --inplace \
  >>"$OUT/build.txt" 2>&1 || echo "BUILD FAILED" | tee -a "$LOG"
python3 -c "from unlearn_fast.kernels.extension import load_extension, extension_has_cuda; print('ext', load_extension() is not None, 'cuda', extension_has_cuda())" >>"$LOG" 2>&1
{ ldd unlearn_fast/_C*.so | grep -E "stdc|gcc_s|gomp"
  python3 -c "import torch, unlearn_fast._C; print(open('/proc/self/maps').read())" | grep -E "libstdc|libgcc_s|libgomp" \
    | awk '{print $6}' | sort -u; } >>"$OUT/build.txt" 2>&1

phase "GPU tests: fused norms, graphed DDP, multi-map, side stream; extension errors"
timeout 75 python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_group_norm_silu.py \
  tests/gpu/test_gpu_vqgan_fused_norms.py tests/gpu/test_gpu_graphed_ddp.py tests/gpu/test_gpu_multi_map_l2.py \
  "tests/gpu/test_gpu_fast_path.py::test_teacher_on_side_stream_equals_sequential_teacher" \
  tests/train/test_device_prefetch.py tests/models/test_mage_attention.py 2>&1 | tail -30 >>"$LOG"
for f in tests/csrc/test_*.py; do  # one process per file, whole verbose output: a crash names its test
  timeout 20 python3 -X faulthandler -m pytest -v -p no:cacheprovider "$f" >>"$OUT/csrc.txt" 2>&1 \
    || echo "$f: exit $? (see csrc.txt)" >>"$LOG"
done

phase "MAGE step benchmarks: reference, fast, fast_bf16 (fused norms) and the unfused variants"
timeout 120 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_unlearn_step.py \
  -k "(gpu_step_reference or gpu_step_fast or gpu_step_fast_bf16) and gpu_mage_base or fast_unfused or fast_bf16_unfused or fast_bf16_cl or explicit_attn" \
  --benchmark-json="$OUT/bench_mage.json" --benchmark-columns=median,rounds 2>&1 | tail -12 >>"$LOG"

phase "bf16 step profiles (MAE-L, MAGE-B)"
timeout 60 python3 benchmarks/profile_step.py --configs gpu_mae_large,gpu_mage_base --variants fast_bf16,fast_bf16_cl \
  --out "$OUT/profile_step.txt" >/dev/null 2>>"$LOG" || echo "profile cut short" >>"$LOG"

phase "torch.compile baseline, MAE-B"
left=$(( BUDGET - ($(date +%s) - t0) - 8 ))
(( left > 20 )) || { echo "skipped (budget spent)" >>"$LOG"; left=1; }
timeout "$left" python3 -m pytest -q -p no:cacheprovider benchmarks/bench_unlearn_step.py \
  -k "compiled and gpu_mae_base" --benchmark-json="$OUT/bench_compiled.json" --benchmark-columns=median \
  2>&1 | tail -6 >>"$LOG"

phase "summary"
python3 benchmarks/summarize_bench.py "$OUT"/bench_*.json >"$OUT/summary.txt" 2>>"$LOG"
cat "$OUT/summary.txt"
phase "done"
