// Declarations shared by bindings.cpp (argument checks, device dispatch, Python module) and the CPU
// (ops_cpu.cpp) and CUDA (ops_cuda.cu) implementations of unlearn_fast._C.
//
// The implementations trust their arguments: bindings.cpp has validated and normalised them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace unlearn_fast {

// Arguments of retain_forget_l2_forward after validation (see bindings.cpp for the public contract).
struct RetainForgetL2Args {
  at::Tensor latent;         // [N, T, D] contiguous, fp32 / fp16 / bf16
  at::Tensor retain_table;   // [R, T, D] contiguous (R may be 0), same dtype as forget_table
  at::Tensor forget_table;   // [F, T, D] contiguous (F may be 0)
  at::Tensor row_is_forget;  // [N] bool, contiguous
  at::Tensor row_index;      // [N] int64, contiguous: row of the table of its class
  at::Tensor norm_weight;    // [D] fp32 contiguous, or undefined: no LayerNorm on the targets
  at::Tensor norm_bias;      // [D] fp32 contiguous; defined exactly when norm_weight is
  double eps = 1e-6;
  double grad_scale = 1.0;
  bool compute_grad = true;
};

// Arguments of multi_map_l2_forward after validation: K maps, map k a contiguous [N, M_k] slab.
struct MultiMapL2Args {
  std::vector<at::Tensor> students;  // K contiguous [N, ...], one dtype (fp32 / fp16 / bf16)
  std::vector<at::Tensor> teachers;  // K contiguous, students[k]'s shape, one dtype
  std::vector<int64_t> row_elems;    // [K] M_k = numel_k / N (>= 1)
  int64_t n = 0;                     // rows, shared by all maps (>= 1)
  double grad_scale = 2.0;
  bool compute_grad = true;
};

// Calls f(T{}) with T the C++ type of dtype t: float, c10::Half or c10::BFloat16, and double when
// kWithDouble. A lighter AT_DISPATCH for the few dtypes these kernels take; use with a generic lambda.
template <bool kWithDouble = false, typename F>
void dispatch_float_types(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); return;
    case at::kHalf: f(c10::Half{}); return;
    case at::kBFloat16: f(c10::BFloat16{}); return;
    case at::kDouble:
      if constexpr (kWithDouble) {
        f(double{});
        return;
      }
      break;
    default: break;
  }
  TORCH_CHECK_TYPE(false, what, ": unsupported dtype ", t);
}

// -> (row_sq [N] fp32, grad [N, T, D] latent dtype or undefined)
std::tuple<at::Tensor, at::Tensor> retain_forget_l2_forward_cpu(const RetainForgetL2Args& args);
// -> (mean, std) 0-d fp32; x contiguous, fp32 / fp64 / fp16 / bf16
std::tuple<at::Tensor, at::Tensor> batch_mean_std_cpu(const at::Tensor& x);
// -> (row_sq [K, N] fp32, grads: K tensors like students[k] = grad_scale * (s - t), or empty)
std::tuple<at::Tensor, std::vector<at::Tensor>> multi_map_l2_forward_cpu(const MultiMapL2Args& args);

#ifdef UNLEARN_FAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> retain_forget_l2_forward_cuda(const RetainForgetL2Args& args);
std::tuple<at::Tensor, at::Tensor> batch_mean_std_cuda(const at::Tensor& x);
std::tuple<at::Tensor, std::vector<at::Tensor>> multi_map_l2_forward_cuda(const MultiMapL2Args& args);
#endif

}  // namespace unlearn_fast
