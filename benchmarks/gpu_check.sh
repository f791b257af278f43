#!/usr/bin/env bash
# GPU check: build the CUDA extension, run the GPU tests and the GPU benchmarks, write results under $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
# Needs torch + triton + pytest-benchmark installed and a CUDA GPU; no internet. Budget: about 6 minutes without
# the optional torch.compile phase (its 120 s come last, so a cut-off run loses only that).
# Files written: log.txt, bench_gpu.json, bench_compiled.json, precision.json, profile.txt, summary.txt
set -u
OUT=${OUT:-/tmp/unlearn_fast_gpu_check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
t0=$(date +%s)
phase() { echo "=== [$(( $(date +%s) - t0 ))s] $*" | tee -a "$LOG"; }

phase "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())"
} >>"$LOG" 2>&1

phase "build extension (CPU + CUDA sources)"
UNLEARN_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 150 python3 setup.py build_ext --inplace >>"$LOG" 2>&1 \
  || echo "BUILD FAILED (continuing with Triton / twin fallbacks)" | tee -a "$LOG"
python3 -c "from unlearn_fast.kernels.extension import load_extension, extension_has_cuda; print('ext', load_extension() is not None, 'cuda', extension_has_cuda())" >>"$LOG" 2>&1

phase "GPU tests"
timeout 110 python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -40 >>"$LOG"
# the extension's own tests in their own process, verbose, so a crash names its test and parameter
timeout 40 python3 -X faulthandler -m pytest -v -p no:cacheprovider tests/csrc 2>&1 | grep -v PASSED | tail -40 >>"$LOG"

phase "GPU benchmarks (reference vs fast vs fast bf16; MAGE variants; loss + noise; Palette loss)"
timeout 200 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_unlearn_step.py benchmarks/bench_loss_noise.py \
  benchmarks/bench_palette_loss.py -k "gpu and not compiled" --benchmark-json="$OUT/bench_gpu.json" \
  --benchmark-columns=median,rounds 2>&1 | tail -30 >>"$LOG"

phase "loss / noise ops: eager vs graph-replayed, profiler tables"
timeout 40 python3 benchmarks/profile_loss_noise.py --out "$OUT/profile.txt" >/dev/null 2>>"$LOG" \
  || echo "profile failed" >>"$LOG"

phase "precision deviation (bf16 vs reference)"
timeout 45 python3 benchmarks/precision_deviation.py --device cuda --model mae_vit_base_patch16 --steps 20 --batch 16 \
  --out "$OUT/precision.json" >/dev/null 2>>"$LOG" || echo "precision check failed" >>"$LOG"

phase "torch.compile baseline (MAE-B, then MAGE-B if time is left)"
timeout 120 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_unlearn_step.py -k "compiled" \
  --benchmark-json="$OUT/bench_compiled.json" --benchmark-columns=median 2>&1 | tail -12 >>"$LOG"

phase "summary"
python3 benchmarks/summarize_bench.py "$OUT"/bench_*.json > "$OUT/summary.txt" 2>>"$LOG"
cat "$OUT/summary.txt"
phase "done"
