// CUDA implementations: the retain/forget L2 rows and the batch moments.
//
// Deterministic and sync-free (CUDA-graph capturable): partial sums have fixed extents and are combined
// in a fixed order by a second kernel; no float atomics, no host reads of device values.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cuda_vector_access.cuh"
#include "unlearn_fast_ops.h"

namespace unlearn_fast {
namespace {

using cuda_detail::kWarp;
using cuda_detail::load_floats;
using cuda_detail::store_floats;
using cuda_detail::warp_sum;
constexpr int kRowsPerBlock = 8;  // one warp per token row
constexpr int kThreads = kWarp * kRowsPerBlock;

// One warp per token row r = i * T + t: target row y (optionally LayerNormed), token_sq[r] = sum (x - y)^2,
// grad[r] = grad_scale * (x - y). Each lane walks the row V elements at a time.
template <typename latent_t, typename table_t, int V>
__global__ void __launch_bounds__(kThreads) retain_forget_l2_token_kernel(
    const latent_t* __restrict__ latent, const table_t* __restrict__ retain, const table_t* __restrict__ forget,
    int64_t retain_rows, int64_t forget_rows, const bool* __restrict__ is_forget,
    const int64_t* __restrict__ row_index, const float* __restrict__ norm_w, const float* __restrict__ norm_b,
    float eps, float grad_scale, latent_t* __restrict__ grad, float* __restrict__ token_sq, int64_t n_rows,
    int64_t t_len, int64_t d) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= n_rows) {
    return;  // whole warps leave together
  }
  const int64_t i = r / t_len, t = r - i * t_len;
  const bool fg = is_forget[i];
  const int64_t rows = fg ? forget_rows : retain_rows;
  // No host sync to raise from here: clamp into the table, and read an empty table as zeros.
  const int64_t idx = row_index[i] < 0 ? 0 : (row_index[i] >= rows ? rows - 1 : row_index[i]);
  const table_t* y = rows > 0 ? (fg ? forget : retain) + (idx * t_len + t) * d : nullptr;
  const latent_t* x = latent + r * d;
  const int64_t step = static_cast<int64_t>(kWarp) * V;

  float mean = 0.f, rstd = 1.f;
  if (norm_w != nullptr) {  // two passes over y (the re-read hits L1): mean, then biased variance
    float s = 0.f;
    if (y != nullptr) {
      for (int64_t k = lane * V; k < d; k += step) {
        float yv[V];
        load_floats<table_t, V>(y + k, yv);
#pragma unroll
        for (int j = 0; j < V; ++j) s += yv[j];
      }
    }
    mean = warp_sum(s) / static_cast<float>(d);
    float q = 0.f;
    if (y != nullptr) {
      for (int64_t k = lane * V; k < d; k += step) {
        float yv[V];
        load_floats<table_t, V>(y + k, yv);
#pragma unroll
        for (int j = 0; j < V; ++j) q += (yv[j] - mean) * (yv[j] - mean);
      }
    }
    rstd = rsqrtf(warp_sum(q) / static_cast<float>(d) + eps);
  }

  float acc = 0.f;
  for (int64_t k = lane * V; k < d; k += step) {
    float xv[V], yv[V];
    load_floats<latent_t, V>(x + k, xv);
    if (y != nullptr) {
      load_floats<table_t, V>(y + k, yv);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) yv[j] = 0.f;
    }
    float gv[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float target = yv[j];
      if (norm_w != nullptr) {
        target = (target - mean) * rstd * norm_w[k + j] + norm_b[k + j];
      }
      const float diff = xv[j] - target;
      acc += diff * diff;
      gv[j] = grad_scale * diff;
    }
    if (grad != nullptr) {
      store_floats<latent_t, V>(grad + r * d + k, gv);
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) {
    token_sq[r] = acc;
  }
}

// One block per sample: row_sq[i] = sum_t token_sq[i * T + t], fp64, fixed-shape tree.
__global__ void __launch_bounds__(kThreads) sum_token_rows_kernel(const float* __restrict__ token_sq,
                                                                  float* __restrict__ row_sq, int64_t t_len) {
  __shared__ double partial[kThreads];
  const int64_t i = blockIdx.x;
  double s = 0.0;
  for (int64_t t = threadIdx.x; t < t_len; t += kThreads) {
    s += static_cast<double>(token_sq[i * t_len + t]);
  }
  partial[threadIdx.x] = s;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      partial[threadIdx.x] += partial[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    row_sq[i] = static_cast<float>(partial[0]);
  }
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// ---- batch moments ----------------------------------------------------------------------------------

constexpr int kMomentBlocks = 1024;  // fixed cap: the partition depends only on numel, so runs agree

struct Moments {
  double count, mean, m2;
};

__device__ __forceinline__ Moments combine(const Moments& a, const Moments& b) {
  if (b.count == 0.0) return a;
  if (a.count == 0.0) return b;
  const double count = a.count + b.count;
  const double delta = b.mean - a.mean;
  return {count, a.mean + delta * (b.count / count), a.m2 + b.m2 + delta * delta * (a.count * b.count / count)};
}

// Tree-combine one Moments per thread in shared memory; thread 0 gets the block's total.
__device__ Moments block_combine(Moments m) {
  __shared__ double count[kThreads], mean[kThreads], m2[kThreads];
  count[threadIdx.x] = m.count;
  mean[threadIdx.x] = m.mean;
  m2[threadIdx.x] = m.m2;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      const Moments c = combine({count[threadIdx.x], mean[threadIdx.x], m2[threadIdx.x]},
                                {count[threadIdx.x + half], mean[threadIdx.x + half], m2[threadIdx.x + half]});
      count[threadIdx.x] = c.count;
      mean[threadIdx.x] = c.mean;
      m2[threadIdx.x] = c.m2;
    }
    __syncthreads();
  }
  return {count[0], mean[0], m2[0]};
}

// Each thread: Welford over a grid-stride slice (fp32, fp64 for fp64 input); each block: its combined moments.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) moments_partial_kernel(const scalar_t* __restrict__ x, int64_t numel,
                                                                   double* __restrict__ parts) {
  using acc_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  acc_t count = 0, mean = 0, m2 = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < numel; k += stride) {
    const acc_t v = static_cast<acc_t>(x[k]);
    count += 1;
    const acc_t delta = v - mean;
    mean += delta / count;
    m2 += delta * (v - mean);
  }
  const Moments total = block_combine({static_cast<double>(count), static_cast<double>(mean),
                                       static_cast<double>(m2)});
  if (threadIdx.x == 0) {
    parts[3 * blockIdx.x + 0] = total.count;
    parts[3 * blockIdx.x + 1] = total.mean;
    parts[3 * blockIdx.x + 2] = total.m2;
  }
}

// One block: combine the per-block moments in a fixed order, write mean and unbiased std.
__global__ void __launch_bounds__(kThreads) moments_final_kernel(const double* __restrict__ parts, int blocks,
                                                                 float* __restrict__ mean_out,
                                                                 float* __restrict__ std_out) {
  Moments m{0.0, 0.0, 0.0};
  for (int b = threadIdx.x; b < blocks; b += kThreads) {
    m = combine(m, {parts[3 * b], parts[3 * b + 1], parts[3 * b + 2]});
  }
  const Moments total = block_combine(m);
  if (threadIdx.x == 0) {
    const double nan = __longlong_as_double(0x7ff8000000000000LL);
    *mean_out = static_cast<float>(total.count > 0.0 ? total.mean : nan);
    *std_out = static_cast<float>(total.count > 1.0 ? sqrt(total.m2 / (total.count - 1.0)) : nan);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> retain_forget_l2_forward_cuda(const RetainForgetL2Args& a) {
  const c10::cuda::CUDAGuard guard(a.latent.device());
  const int64_t n = a.latent.size(0), t_len = a.latent.size(1), d = a.latent.size(2);
  const int64_t n_rows = n * t_len;
  at::Tensor row_sq = at::empty({n}, a.latent.options().dtype(at::kFloat));   // [N]
  at::Tensor grad = a.compute_grad ? at::empty_like(a.latent) : at::Tensor();  // [N, T, D]
  if (n == 0) {
    return {row_sq, grad};
  }
  at::Tensor token_sq = at::empty({n_rows}, row_sq.options());  // [N * T]; T == 0: rows sum nothing
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* w = a.norm_weight.defined() ? a.norm_weight.const_data_ptr<float>() : nullptr;
  const float* b = a.norm_bias.defined() ? a.norm_bias.const_data_ptr<float>() : nullptr;

  dispatch_float_types(a.latent.scalar_type(), "retain_forget_l2_forward (latent)", [&](auto latent_tag) {
    using latent_t = decltype(latent_tag);
    dispatch_float_types(a.retain_table.scalar_type(), "retain_forget_l2_forward (tables)", [&](auto table_tag) {
      using table_t = decltype(table_tag);
      constexpr int kVec = 16 / (sizeof(latent_t) > sizeof(table_t) ? sizeof(latent_t) : sizeof(table_t));
      const latent_t* x = a.latent.const_data_ptr<latent_t>();
      const table_t* retain = a.retain_table.const_data_ptr<table_t>();
      const table_t* forget = a.forget_table.const_data_ptr<table_t>();
      latent_t* g = grad.defined() ? grad.data_ptr<latent_t>() : nullptr;
      const bool vec = d % kVec == 0 && aligned16(x) && aligned16(retain) && aligned16(forget) &&
                       (g == nullptr || aligned16(g));
      if (n_rows > 0) {
        const dim3 blocks(static_cast<unsigned>((n_rows + kRowsPerBlock - 1) / kRowsPerBlock));
        auto launch = [&](auto kernel) {
          kernel<<<blocks, kThreads, 0, stream>>>(
              x, retain, forget, a.retain_table.size(0), a.forget_table.size(0),
              a.row_is_forget.const_data_ptr<bool>(), a.row_index.const_data_ptr<int64_t>(), w, b,
              static_cast<float>(a.eps), static_cast<float>(a.grad_scale), g, token_sq.data_ptr<float>(), n_rows,
              t_len, d);
        };
        if (vec) {
          launch(retain_forget_l2_token_kernel<latent_t, table_t, kVec>);
        } else {
          launch(retain_forget_l2_token_kernel<latent_t, table_t, 1>);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  sum_token_rows_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(token_sq.const_data_ptr<float>(),
                                                                           row_sq.data_ptr<float>(), t_len);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {row_sq, grad};
}

std::tuple<at::Tensor, at::Tensor> batch_mean_std_cuda(const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto options = x.options().dtype(at::kFloat);
  const int64_t numel = x.numel();
  if (numel == 0) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {at::full({}, nan, options), at::full({}, nan, options)};
  }
  at::Tensor mean = at::empty({}, options);
  at::Tensor std = at::empty({}, options);
  const int blocks = static_cast<int>(std::min<int64_t>(kMomentBlocks, (numel + kThreads - 1) / kThreads));
  at::Tensor parts = at::empty({blocks, 3}, x.options().dtype(at::kDouble));  // [blocks, (count, mean, M2)]
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types<true>(x.scalar_type(), "batch_mean_std", [&](auto tag) {
    using scalar_t = decltype(tag);
    moments_partial_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), numel,
                                                                      parts.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  moments_final_kernel<<<1, kThreads, 0, stream>>>(parts.const_data_ptr<double>(), blocks, mean.data_ptr<float>(),
                                                   std.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mean, std};
}

}  // namespace unlearn_fast
