// Device helpers shared by the CUDA kernels: warp sums and packed (up to 16-byte) loads/stores.
#pragma once

namespace unlearn_fast {
namespace cuda_detail {

constexpr int kWarp = 32;

// Butterfly reduction over the warp: the same order on every run (deterministic).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// V consecutive elements moved as one (16-byte or narrower) access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    out[j] = static_cast<float>(pk.v[j]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    pk.v[j] = static_cast<T>(in[j]);
  }
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

}  // namespace cuda_detail
}  // namespace unlearn_fast
