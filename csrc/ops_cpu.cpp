// CPU implementations: the retain/forget L2 rows and the batch moments, parallel with at::parallel_for.
//
// Both are deterministic whatever the thread count: every partial sum has a fixed extent (one token row,
// one fixed-size chunk) and the partials are combined sequentially in index order.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "unlearn_fast_ops.h"

namespace unlearn_fast {
namespace {

// In place over one row y[0:d]: (y - mean) / sqrt(var + eps) * w + b, biased variance (fp64 moments).
void layer_norm_row(float* y, int64_t d, const float* w, const float* b, double eps) {
  if (d == 0) {
    return;
  }
  double sum = 0.0;
  for (int64_t k = 0; k < d; ++k) {
    sum += y[k];
  }
  const double mean = sum / static_cast<double>(d);
  double sq = 0.0;
  for (int64_t k = 0; k < d; ++k) {
    const double c = y[k] - mean;
    sq += c * c;
  }
  const float rstd = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(d) + eps));
  const float mean_f = static_cast<float>(mean);
  for (int64_t k = 0; k < d; ++k) {
    y[k] = (y[k] - mean_f) * rstd * w[k] + b[k];
  }
}

// sum_k (x_k - y_k)^2 in fp64 (four fixed accumulators); writes g_k = grad_scale * (x_k - y_k) when g.
template <typename latent_t>
double squared_diff_row(const latent_t* x, const float* y, int64_t d, float grad_scale, latent_t* g) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t k = 0;
  for (; k + 4 <= d; k += 4) {
    for (int j = 0; j < 4; ++j) {
      const float diff = static_cast<float>(x[k + j]) - y[k + j];
      acc[j] += static_cast<double>(diff) * diff;
      if (g != nullptr) {
        g[k + j] = static_cast<latent_t>(grad_scale * diff);
      }
    }
  }
  for (; k < d; ++k) {
    const float diff = static_cast<float>(x[k]) - y[k];
    acc[0] += static_cast<double>(diff) * diff;
    if (g != nullptr) {
      g[k] = static_cast<latent_t>(grad_scale * diff);
    }
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// An out-of-range index into a non-empty table is a caller bug; on the CPU checking costs one pass over N,
// so raise (the CUDA path clamps instead: it cannot raise without a host sync). An empty table is not an
// error: its rows read as zeros, as in the Triton kernel and the PyTorch twin.
void check_row_index(const RetainForgetL2Args& a) {
  const int64_t n = a.latent.size(0);
  const bool* is_forget = a.row_is_forget.const_data_ptr<bool>();
  const int64_t* row_index = a.row_index.const_data_ptr<int64_t>();
  const int64_t retain_rows = a.retain_table.size(0);
  const int64_t forget_rows = a.forget_table.size(0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t rows = is_forget[i] ? forget_rows : retain_rows;
    TORCH_CHECK_VALUE(rows == 0 || (row_index[i] >= 0 && row_index[i] < rows), "retain_forget_l2_forward: row ",
                      i, " (", is_forget[i] ? "forget" : "retain", ") has row_index ", row_index[i],
                      ", out of range for ", is_forget[i] ? "forget_table" : "retain_table", " with ", rows,
                      " rows");
  }
}

template <typename latent_t, typename table_t>
void retain_forget_l2_token_rows(const RetainForgetL2Args& a, double* token_sq, latent_t* grad) {
  const int64_t n = a.latent.size(0), t_len = a.latent.size(1), d = a.latent.size(2);
  const latent_t* latent = a.latent.const_data_ptr<latent_t>();
  const table_t* retain = a.retain_table.const_data_ptr<table_t>();
  const table_t* forget = a.forget_table.const_data_ptr<table_t>();
  const int64_t retain_rows = a.retain_table.size(0), forget_rows = a.forget_table.size(0);
  const bool* is_forget = a.row_is_forget.const_data_ptr<bool>();
  const int64_t* row_index = a.row_index.const_data_ptr<int64_t>();
  const float* w = a.norm_weight.defined() ? a.norm_weight.const_data_ptr<float>() : nullptr;
  const float* b = a.norm_bias.defined() ? a.norm_bias.const_data_ptr<float>() : nullptr;
  const float grad_scale = static_cast<float>(a.grad_scale);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));  // ~16K elements a task

  // One task = a range of token rows r = i * T + t; each row's sum is computed by one thread, in order.
  at::parallel_for(0, n * t_len, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> target(static_cast<size_t>(d));  // [D] fp32 target row
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r / t_len, t = r % t_len;
      const int64_t rows = is_forget[i] ? forget_rows : retain_rows;
      if (rows > 0) {
        const table_t* src = (is_forget[i] ? forget : retain) + (row_index[i] * t_len + t) * d;
        for (int64_t k = 0; k < d; ++k) {
          target[k] = static_cast<float>(src[k]);
        }
      } else {
        std::fill(target.begin(), target.end(), 0.f);  // empty table: target 0
      }
      if (w != nullptr) {
        layer_norm_row(target.data(), d, w, b, a.eps);
      }
      token_sq[r] = squared_diff_row(latent + r * d, target.data(), d, grad_scale,
                                     grad != nullptr ? grad + r * d : nullptr);
    }
  });
}

// Moments of one chunk, two passes over data that is still in cache: (count, mean, M2).
struct Moments {
  double count = 0.0, mean = 0.0, m2 = 0.0;
};

// Chan et al.'s pairwise combination: exact for the mean, stable for M2.
Moments combine(const Moments& a, const Moments& b) {
  if (b.count == 0.0) {
    return a;
  }
  if (a.count == 0.0) {
    return b;
  }
  Moments c;
  c.count = a.count + b.count;
  const double delta = b.mean - a.mean;
  c.mean = a.mean + delta * (b.count / c.count);
  c.m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / c.count);
  return c;
}

template <typename scalar_t>
Moments chunk_moments(const scalar_t* x, int64_t len) {
  Moments m;
  double sum = 0.0;
  for (int64_t k = 0; k < len; ++k) {
    sum += static_cast<double>(x[k]);
  }
  m.count = static_cast<double>(len);
  m.mean = sum / m.count;
  for (int64_t k = 0; k < len; ++k) {
    const double c = static_cast<double>(x[k]) - m.mean;
    m.m2 += c * c;
  }
  return m;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> retain_forget_l2_forward_cpu(const RetainForgetL2Args& a) {
  check_row_index(a);
  const int64_t n = a.latent.size(0), t_len = a.latent.size(1);
  at::Tensor row_sq = at::empty({n}, a.latent.options().dtype(at::kFloat));  // [N]
  at::Tensor grad = a.compute_grad ? at::empty_like(a.latent) : at::Tensor();  // [N, T, D]
  std::vector<double> token_sq(static_cast<size_t>(n * t_len));  // [N * T] per token row

  dispatch_float_types(a.latent.scalar_type(), "retain_forget_l2_forward (latent)", [&](auto latent_tag) {
    using latent_t = decltype(latent_tag);
    dispatch_float_types(a.retain_table.scalar_type(), "retain_forget_l2_forward (tables)", [&](auto table_tag) {
      using table_t = decltype(table_tag);
      retain_forget_l2_token_rows<latent_t, table_t>(a, token_sq.data(),
                                                     grad.defined() ? grad.data_ptr<latent_t>() : nullptr);
    });
  });

  float* out = row_sq.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    double s = 0.0;
    for (int64_t t = 0; t < t_len; ++t) {
      s += token_sq[i * t_len + t];
    }
    out[i] = static_cast<float>(s);
  }
  return {row_sq, grad};
}

std::tuple<at::Tensor, at::Tensor> batch_mean_std_cpu(const at::Tensor& x) {
  constexpr int64_t kChunk = 1 << 15;  // fixed chunking: the result does not depend on the thread count
  const int64_t numel = x.numel();
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  std::vector<Moments> parts(static_cast<size_t>(chunks));

  dispatch_float_types<true>(x.scalar_type(), "batch_mean_std", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t start = c * kChunk;
        parts[c] = chunk_moments(data + start, std::min(kChunk, numel - start));
      }
    });
  });

  Moments total;
  for (const Moments& p : parts) {
    total = combine(total, p);
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double mean = total.count > 0.0 ? total.mean : nan;
  const double std = total.count > 1.0 ? std::sqrt(total.m2 / (total.count - 1.0)) : nan;
  const auto options = x.options().dtype(at::kFloat);
  return {at::scalar_tensor(mean, options), at::scalar_tensor(std, options)};
}

}  // namespace unlearn_fast
