// CPU multi-map L2: per-(map, row) squared distances and the student gradients of K maps in one call.
//
// The work is a flat list of fixed-size chunks (map k, row i, chunk c) over all maps, split across threads
// by at::parallel_for, so maps of very different sizes still balance. Each chunk's sum is computed by one
// thread in fixed order and the chunks of a row are added in index order: deterministic whatever the
// thread count.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <vector>

#include "unlearn_fast_ops.h"

namespace unlearn_fast {
namespace {

constexpr int64_t kChunk = 16384;  // elements per work item

// sum_j (x_j - y_j)^2 in fp64 (four fixed accumulators); writes g_j = grad_scale * (x_j - y_j) when g.
template <typename student_t, typename teacher_t>
double squared_diff_chunk(const student_t* x, const teacher_t* y, int64_t len, float grad_scale, student_t* g) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  for (; j + 4 <= len; j += 4) {
    for (int u = 0; u < 4; ++u) {
      const float diff = static_cast<float>(x[j + u]) - static_cast<float>(y[j + u]);
      acc[u] += static_cast<double>(diff) * diff;
      if (g != nullptr) {
        g[j + u] = static_cast<student_t>(grad_scale * diff);
      }
    }
  }
  for (; j < len; ++j) {
    const float diff = static_cast<float>(x[j]) - static_cast<float>(y[j]);
    acc[0] += static_cast<double>(diff) * diff;
    if (g != nullptr) {
      g[j] = static_cast<student_t>(grad_scale * diff);
    }
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> multi_map_l2_forward_cpu(const MultiMapL2Args& a) {
  const int64_t k_maps = static_cast<int64_t>(a.students.size()), n = a.n;
  // first_chunk[p], p = k * N + i: index of the first work item of (map k, row i); a row's items are consecutive
  std::vector<int64_t> first_chunk(static_cast<size_t>(k_maps * n + 1), 0);
  for (int64_t k = 0; k < k_maps; ++k) {
    const int64_t chunks = (a.row_elems[k] + kChunk - 1) / kChunk;
    for (int64_t i = 0; i < n; ++i) {
      first_chunk[k * n + i + 1] = first_chunk[k * n + i] + chunks;
    }
  }
  const int64_t items = first_chunk.back();
  std::vector<double> partial(static_cast<size_t>(items));  // [items] per-chunk sums
  std::vector<at::Tensor> grads;
  if (a.compute_grad) {
    for (const at::Tensor& s : a.students) {
      grads.push_back(at::empty_like(s));
    }
  }

  dispatch_float_types(a.students[0].scalar_type(), "multi_map_l2_forward (students)", [&](auto student_tag) {
    using student_t = decltype(student_tag);
    dispatch_float_types(a.teachers[0].scalar_type(), "multi_map_l2_forward (teachers)", [&](auto teacher_tag) {
      using teacher_t = decltype(teacher_tag);
      std::vector<const student_t*> xs;
      std::vector<const teacher_t*> ys;
      std::vector<student_t*> gs;
      for (int64_t k = 0; k < k_maps; ++k) {
        xs.push_back(a.students[k].const_data_ptr<student_t>());
        ys.push_back(a.teachers[k].const_data_ptr<teacher_t>());
        gs.push_back(a.compute_grad ? grads[k].data_ptr<student_t>() : nullptr);
      }
      const float grad_scale = static_cast<float>(a.grad_scale);
      at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
        // (map, row) of the first item, then walk forward
        int64_t p = std::upper_bound(first_chunk.begin(), first_chunk.end(), begin) - first_chunk.begin() - 1;
        for (int64_t item = begin; item < end; ++item) {
          while (first_chunk[p + 1] <= item) {
            ++p;
          }
          const int64_t k = p / n, i = p % n, m = a.row_elems[k];
          const int64_t offset = (item - first_chunk[p]) * kChunk;
          const int64_t start = i * m + offset;
          partial[item] = squared_diff_chunk(xs[k] + start, ys[k] + start, std::min(kChunk, m - offset),
                                             grad_scale, gs[k] != nullptr ? gs[k] + start : nullptr);
        }
      });
    });
  });

  at::Tensor row_sq = at::empty({k_maps, n}, a.students[0].options().dtype(at::kFloat));  // [K, N]
  float* out = row_sq.data_ptr<float>();
  for (int64_t p = 0; p < k_maps * n; ++p) {
    double s = 0.0;
    for (int64_t item = first_chunk[p]; item < first_chunk[p + 1]; ++item) {
      s += partial[item];
    }
    out[p] = static_cast<float>(s);
  }
  return {row_sq, grads};
}

}  // namespace unlearn_fast
