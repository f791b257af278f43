// CUDA multi-map L2: per-(map, row) squared distances and the student gradients of K maps in one launch.
//
// The maps' addresses travel in a kernel argument (a table of up to kMaxMaps maps, < 4 KB), so there is no
// host-to-device copy and the launch is CUDA-graph capturable. One block per tile of kTile elements of one
// row of one map; a second small kernel adds each row's tiles in a fixed order (deterministic, no atomics,
// no host sync). More than kMaxMaps maps take one launch pair per group of kMaxMaps.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cuda_vector_access.cuh"
#include "unlearn_fast_ops.h"

namespace unlearn_fast {
namespace {

using cuda_detail::kWarp;
using cuda_detail::load_floats;
using cuda_detail::store_floats;
using cuda_detail::warp_sum;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int64_t kTile = 4096;  // elements of one row per block
constexpr int kMaxMaps = 32;     // maps per launch (the table is a kernel argument)

struct MapTable {
  const void* student[kMaxMaps];
  const void* teacher[kMaxMaps];
  void* grad[kMaxMaps];           // nullptr: no gradient
  int64_t row_elems[kMaxMaps];    // M_k
  int64_t chunks[kMaxMaps];       // tiles per row of map k
  int64_t first_tile[kMaxMaps + 1];  // map k owns blocks [first_tile[k], first_tile[k + 1]), row-major
  int count;
};

// Block b = one tile (map k, row, chunk): partial[(k_global * N + row) * max_chunks + chunk] = sum (s - t)^2
// over the tile; grad = grad_scale * (s - t). V > 1 only when every row length is a multiple of V and every
// address is 16-byte aligned (checked on the host).
template <typename student_t, typename teacher_t, int V>
__global__ void __launch_bounds__(kThreads) multi_map_l2_tile_kernel(const MapTable table, int64_t n,
                                                                     int64_t max_chunks, int64_t map_offset,
                                                                     float grad_scale, float* __restrict__ partial) {
  const int64_t tile = blockIdx.x;
  int k = 0;
  while (tile >= table.first_tile[k + 1]) {
    ++k;
  }
  const int64_t local = tile - table.first_tile[k];
  const int64_t row = local / table.chunks[k], chunk = local - row * table.chunks[k];
  const int64_t m = table.row_elems[k];
  const int64_t begin = row * m + chunk * kTile;
  const int64_t len = m - chunk * kTile < kTile ? m - chunk * kTile : kTile;
  const student_t* x = static_cast<const student_t*>(table.student[k]) + begin;
  const teacher_t* y = static_cast<const teacher_t*>(table.teacher[k]) + begin;
  student_t* g = table.grad[k] != nullptr ? static_cast<student_t*>(table.grad[k]) + begin : nullptr;

  float acc = 0.f;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < len; j += static_cast<int64_t>(kThreads) * V) {
    float xv[V], yv[V], gv[V];
    load_floats<student_t, V>(x + j, xv);
    load_floats<teacher_t, V>(y + j, yv);
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const float diff = xv[u] - yv[u];
      acc += diff * diff;
      gv[u] = grad_scale * diff;
    }
    if (g != nullptr) {
      store_floats<student_t, V>(g + j, gv);
    }
  }
  __shared__ float warp_totals[kWarps];
  acc = warp_sum(acc);
  if (threadIdx.x % kWarp == 0) {
    warp_totals[threadIdx.x / kWarp] = acc;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      total += warp_totals[w];  // fixed order
    }
    partial[((map_offset + k) * n + row) * max_chunks + chunk] = total;
  }
}

// One warp per (map, row) of the group: row_sq[k_global, row] = sum of its tiles' partials (fp64, fixed order).
__global__ void __launch_bounds__(kThreads) multi_map_row_sum_kernel(const MapTable table, int64_t n,
                                                                     int64_t max_chunks, int64_t map_offset,
                                                                     const float* __restrict__ partial,
                                                                     float* __restrict__ row_sq) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (p >= table.count * n) {
    return;  // whole warps leave together
  }
  const int lane = threadIdx.x % kWarp;
  const int64_t k = p / n, row = p - k * n;
  const int64_t out = (map_offset + k) * n + row;
  double s = 0.0;
  for (int64_t c = lane; c < table.chunks[k]; c += kWarp) {
    s += static_cast<double>(partial[out * max_chunks + c]);
  }
  s = warp_sum(s);
  if (lane == 0) {
    row_sq[out] = static_cast<float>(s);
  }
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> multi_map_l2_forward_cuda(const MultiMapL2Args& a) {
  const c10::cuda::CUDAGuard guard(a.students[0].device());
  const int64_t k_maps = static_cast<int64_t>(a.students.size()), n = a.n;
  std::vector<at::Tensor> grads;
  if (a.compute_grad) {
    for (const at::Tensor& s : a.students) {
      grads.push_back(at::empty_like(s));
    }
  }
  int64_t max_chunks = 1;
  for (int64_t m : a.row_elems) {
    max_chunks = std::max(max_chunks, (m + kTile - 1) / kTile);
  }
  const auto f32 = a.students[0].options().dtype(at::kFloat);
  at::Tensor row_sq = at::empty({k_maps, n}, f32);                 // [K, N]
  at::Tensor partial = at::empty({k_maps * n * max_chunks}, f32);  // [K * N * max_chunks], unused slots unread
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_float_types(a.students[0].scalar_type(), "multi_map_l2_forward (students)", [&](auto student_tag) {
    using student_t = decltype(student_tag);
    dispatch_float_types(a.teachers[0].scalar_type(), "multi_map_l2_forward (teachers)", [&](auto teacher_tag) {
      using teacher_t = decltype(teacher_tag);
      constexpr int kVec = 16 / (sizeof(student_t) > sizeof(teacher_t) ? sizeof(student_t) : sizeof(teacher_t));
      for (int64_t k0 = 0; k0 < k_maps; k0 += kMaxMaps) {
        MapTable table{};
        table.count = static_cast<int>(std::min<int64_t>(kMaxMaps, k_maps - k0));
        bool vec = true;
        for (int j = 0; j < table.count; ++j) {
          const int64_t k = k0 + j, m = a.row_elems[k];
          table.student[j] = a.students[k].const_data_ptr<student_t>();
          table.teacher[j] = a.teachers[k].const_data_ptr<teacher_t>();
          table.grad[j] = a.compute_grad ? grads[k].data_ptr<student_t>() : nullptr;
          table.row_elems[j] = m;
          table.chunks[j] = (m + kTile - 1) / kTile;
          table.first_tile[j + 1] = table.first_tile[j] + n * table.chunks[j];
          vec = vec && m % kVec == 0 && aligned16(table.student[j]) && aligned16(table.teacher[j]) &&
                (table.grad[j] == nullptr || aligned16(table.grad[j]));
        }
        for (int j = table.count; j < kMaxMaps; ++j) {
          table.first_tile[j + 1] = table.first_tile[table.count];  // the scan never passes the last map
        }
        const int64_t tiles = table.first_tile[table.count];
        TORCH_CHECK_VALUE(tiles <= 0x7fffffff, "multi_map_l2_forward: ", tiles, " tiles exceed the grid limit");
        auto launch = [&](auto kernel) {
          kernel<<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(table, n, max_chunks, k0,
                                                                        static_cast<float>(a.grad_scale),
                                                                        partial.data_ptr<float>());
        };
        if (vec) {
          launch(multi_map_l2_tile_kernel<student_t, teacher_t, kVec>);
        } else {
          launch(multi_map_l2_tile_kernel<student_t, teacher_t, 1>);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const int64_t pairs = static_cast<int64_t>(table.count) * n;
        multi_map_row_sum_kernel<<<static_cast<unsigned>((pairs + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
            table, n, max_chunks, k0, partial.const_data_ptr<float>(), row_sq.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {row_sq, grads};
}

}  // namespace unlearn_fast
