#!/usr/bin/env bash
# The short GPU check (GPU_CHECK_BUDGET seconds, default 420; each phase gets its cap or what is left): the GPU
# tests of the fast path's newest parts (the extension building beside them), the MAGE and MAE-L step benchmarks with their A/B
# variants, the fused norm at the VQGAN's shapes, the bf16 step profiles, then the torch.compile baseline of MAE-B
# if time is left. Results under $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_check_quick.sh
# Files (13; the device tool returns 8: point OUT elsewhere and tar it into the tool's $OUT, as for gpu_check.sh):
# log.txt, build.txt (toolchain facts + build log), csrc.txt, bench_mage.json, bench_mae.json, bench_compiled.json,
# profile_group_norm.json, profile_add_layer_norm.json, profile_residual_pool.json, profile_step.txt/.json, summary.txt,
# bench_rows.jsonl (a previous run's files in $OUT move to $OUT/previous-<time>/ first)
OUT_DEFAULT=/tmp/unlearn_fast_gpu_check_quick BUDGET_DEFAULT=420  # each phase: its cap or what is left
source "$(dirname "$0")/gpu_common.sh"

phase "GPU tests: fused norms, add + LayerNorm, pool, opt-in paths, graphed DDP, multi-map, side stream (the extension building beside them)"
start_extension_build
run_for 100 python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_group_norm_silu.py \
  tests/gpu/test_gpu_vqgan_fused_norms.py tests/gpu/test_gpu_graphed_ddp.py tests/gpu/test_gpu_multi_map_l2.py \
  "tests/gpu/test_gpu_fast_path.py::test_teacher_on_side_stream_equals_sequential_teacher" \
  "tests/gpu/test_gpu_fast_path.py::test_default_fused_forms_capture_and_keep_the_fp32_trajectory" \
  "tests/gpu/test_gpu_fast_path.py::test_default_fused_forms_in_bf16_are_as_close_to_fp32_as_the_plain_forms" \
  "tests/gpu/test_gpu_fast_path.py::test_adamw_with_copies_kernel_matches_torch_fused_adamw_on_gpu" \
  "tests/gpu/test_gpu_fast_path.py::test_half_student_captures_and_keeps_the_trajectory" \
  "tests/gpu/test_gpu_fast_path.py::test_philox_normals_on_gpu_within_1e_5_of_the_exact_box_muller" \
  tests/gpu/test_gpu_add_layer_norm.py tests/gpu/test_gpu_residual_avg_pool.py tests/models/test_visible_patches.py \
  tests/train/test_device_prefetch.py tests/models/test_mage_attention.py 2>&1 | tail -30 >>"$LOG"
finish_extension_build 120

phase "MAGE step benchmarks: reference, fast, fast_bf16 (fused norms) and the unfused variants"
run_for 120 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_unlearn_step.py \
  -k "(gpu_step_reference or gpu_step_fast or gpu_step_fast_bf16) and gpu_mage_base or fast_unfused or fast_bf16_unfused or fast_nchw or fast_bf16_nchw or explicit_attn or mage_variants and plain_blocks or unpadded or split_pool" \
  --benchmark-json="$OUT/bench_mage.json" --benchmark-columns=median,rounds 2>&1 | tail -12 >>"$LOG"

phase "MAE-L bf16: its A/B variants (the conv over every patch, the opt-in half_student and fold_clip, ...)"
run_for 60 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_unlearn_step.py \
  -k "gpu_step_fast_bf16 and gpu_mae_large or mae_variants and gpu_mae_large and bf16" \
  --benchmark-json="$OUT/bench_mae.json" --benchmark-columns=median,rounds 2>&1 | tail -8 >>"$LOG"

phase "the fused norms and pool at the models' shapes against torch's ops"
fused_op_profiles

phase "bf16 step profiles (MAE-L, MAGE-B)"
run_for 60 python3 benchmarks/profile_step.py --configs gpu_mae_large,gpu_mage_base --variants fast_bf16,fast_bf16_nchw \
  --out "$OUT/profile_step.txt" >/dev/null 2>>"$LOG" || echo "profile cut short" >>"$LOG"

phase "the extension's tests (tests/csrc one file per process; the GPU tests' extension cases)"
extension_tests

phase "torch.compile baseline, MAE-B"
run_for "$BUDGET" python3 -m pytest -q -p no:cacheprovider benchmarks/bench_unlearn_step.py \
  -k "compiled and gpu_mae_base" --benchmark-json="$OUT/bench_compiled.json" --benchmark-columns=median \
  2>&1 | tail -6 >>"$LOG"

summarize
