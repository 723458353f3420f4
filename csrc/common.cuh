// Device helpers shared by the fastgpt kernels: element conversion, 16-byte vector access, the
// warp and row reductions, the launch macro and launch-size helpers.
//
// Everything that touches the CUDA execution model (shuffles, barriers, __shared__ storage, kernel
// launches) goes through the few helpers below, so the CPU emulator of the test suite
// (tests/cuda_emu/cuda_shim.h) only has to map a handful of primitives to host code. The emulator
// compiles this file and the kernels unmodified; it predefines FASTGPT_EMULATOR and its own
// FASTGPT_LAUNCH / FASTGPT_SHARED.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fastgpt_cuda.h"

// Kernel launch: FASTGPT_LAUNCH(grid, block, shared_bytes, stream, kernel<...>)(args...).
#ifndef FASTGPT_LAUNCH
#define FASTGPT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#endif

// Static shared memory: one array per block, `count` elements of `type`.
#ifndef FASTGPT_SHARED
#define FASTGPT_SHARED(type, name, count) __shared__ type name[count]
#endif

namespace fastgpt {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// ---- element types ---------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// v rounded to T and back: what storing v in a T tensor keeps.
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// ---- vector access ---------------------------------------------------------------------------
//
// A pack is VEC consecutive elements. VEC * sizeof(T) == 16 on the vectorised paths (one 128-bit
// load or store per pack; a float32 parameter pack for 16-bit x is 32 bytes, two 128-bit accesses),
// VEC == 1 on the scalar paths that take misaligned pointers and odd sizes.

template <typename T, int VEC>
struct alignas((sizeof(T) * VEC) < 16 ? (sizeof(T) * VEC) : 16) Pack {
  T v[VEC];
};

// A pack as stored in memory: one 128-bit access when VEC * sizeof(T) == 16. p must be aligned to
// the pack (the launchers check it).
// Packs of 16 or 32 bytes move as uint4 words, so the compiler emits 128-bit accesses (it splits
// some plain struct copies into 32-bit ones). Type punning through the vector type, as CUDA code
// does (the emulator build compiles with -fno-strict-aliasing accordingly).
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_raw(const T* __restrict__ p) {
  Pack<T, VEC> pk;
  if constexpr (sizeof(pk) % 16 == 0) {
#pragma unroll
    for (int k = 0; k < (int)(sizeof(pk) / 16); ++k) reinterpret_cast<uint4*>(&pk)[k] = reinterpret_cast<const uint4*>(p)[k];
  } else {
    pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
  }
  return pk;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_raw(T* __restrict__ p, const Pack<T, VEC>& pk) {
  if constexpr (sizeof(pk) % 16 == 0) {
#pragma unroll
    for (int k = 0; k < (int)(sizeof(pk) / 16); ++k) reinterpret_cast<uint4*>(p)[k] = reinterpret_cast<const uint4*>(&pk)[k];
  } else {
    *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void unpack(const Pack<T, VEC>& pk, float (&out)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_float(pk.v[j]);
}

// in[] rounded to T.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> to_pack(const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = from_float<T>(in[j]);
  return pk;
}

// p[0..VEC) as float.
template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* __restrict__ p, float (&out)[VEC]) {
  unpack<T, VEC>(load_raw<T, VEC>(p), out);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* __restrict__ p, const float (&in)[VEC]) {
  store_raw<T, VEC>(p, to_pack<T, VEC>(in));
}

// An optional per-column parameter: p[c..c+VEC) or `fill` when p is null.
template <typename T, int VEC>
__device__ __forceinline__ void load_param(const T* __restrict__ p, int64_t c, float fill, float (&out)[VEC]) {
  if (p != nullptr) {
    load_pack<T, VEC>(p + c, out);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = fill;
  }
}

// ---- reductions --------------------------------------------------------------------------------

// Sums each v[k] over the `group` consecutive lanes (a power of two <= 32, aligned) that hold this
// lane; every lane of the group ends with the same totals. All 32 lanes of the warp must call it.
template <int K>
__device__ __forceinline__ void warp_allreduce(float (&v)[K], int group) {
  for (int offset = group >> 1; offset > 0; offset >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(kFullMask, v[k], offset);
  }
}

// Row-wise all-reduce for kernels that give each row blockDim.x threads (a power of two, up to
// 1024) and each block blockDim.y rows: sums v[k] over the threads of this thread's row, and every
// thread of the row gets the same totals, summed in the same order (deterministic).
//
// Every thread of the block must call allreduce the same number of times (rows past the end take
// part with zeros), since rows wider than a warp go through shared memory and __syncthreads. The
// two shared buffers alternate between calls: a thread can only overwrite a buffer after every
// thread has passed the barrier of the call in between, which each reaches after its last read.
template <int K>
struct RowReducer {
  int phase = 0;

  __device__ __forceinline__ void allreduce(float (&v)[K]) {
    const int tpr = blockDim.x;
    warp_allreduce<K>(v, tpr < kWarp ? tpr : kWarp);
    if (tpr <= kWarp) return;
    FASTGPT_SHARED(float, partial, 2 * K * kWarp);
    float* buf = partial + phase * (K * kWarp);
    phase ^= 1;
    const int linear = threadIdx.y * tpr + threadIdx.x;
    const int warp = linear / kWarp;
    if (linear % kWarp == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) buf[k * kWarp + warp] = v[k];
    }
    __syncthreads();
    const int warps_per_row = tpr / kWarp;
    const int first = threadIdx.y * warps_per_row;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float total = 0.f;
      for (int w = 0; w < warps_per_row; ++w) total += buf[k * kWarp + first + w];
      v[k] = total;
    }
  }
};

// ---- launch helpers ------------------------------------------------------------------------------

struct DeviceLimits {
  int sms;                // streaming multiprocessors
  int threads_per_sm;     // resident threads per SM
};

inline DeviceLimits device_limits() {
  int dev = 0;
  DeviceLimits d{1, 1024};
  if (cudaGetDevice(&dev) != cudaSuccess) return d;
  cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&d.threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, dev);
  if (d.sms < 1) d.sms = 1;
  if (d.threads_per_sm < 32) d.threads_per_sm = 1024;
  return d;
}

// Blocks of `threads` threads that fill the device once (the grid of a grid-stride kernel).
inline int64_t resident_blocks(const DeviceLimits& d, int threads) {
  const int per_sm = d.threads_per_sm / threads;
  return (int64_t)d.sms * (per_sm > 0 ? per_sm : 1);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline bool aligned(const void* p, size_t bytes) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

// Elements of T in one 16-byte pack.
template <typename T>
constexpr int vec_of() {
  return 16 / sizeof(T);
}

inline bool valid_dtype(int64_t dtype) { return dtype == FG_FLOAT32 || dtype == FG_FLOAT16 || dtype == FG_BFLOAT16; }

// A parameter dtype goes with x's dtype: the same, or float32 (the autocast layout).
inline bool valid_param_dtype(int64_t x_dtype, int64_t p_dtype) { return p_dtype == x_dtype || p_dtype == FG_FLOAT32; }

// Sums rows of float32 partials: out_k[c] = sum_r partial_k[r * cols + c] for k = 0, 1, in a fixed
// order (deterministic). out_k may be null (not wanted). Written in `out_dtype`. (layer_norm.cu)
cudaError_t launch_column_sums(const float* partial0, const float* partial1, int64_t partial_rows, int64_t cols,
                               void* out0, void* out1, int64_t out_dtype, cudaStream_t stream);

}  // namespace fastgpt

// Calls F<T>(...) with T the element type of `dtype` (FG_FLOAT32 / FG_FLOAT16 / FG_BFLOAT16).
#define FASTGPT_DISPATCH_DTYPE(dtype, T, ...)  \
  switch (dtype) {                             \
    case FG_FLOAT32: {                         \
      using T = float;                         \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
    case FG_FLOAT16: {                         \
      using T = __half;                        \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
    case FG_BFLOAT16: {                        \
      using T = __nv_bfloat16;                 \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
    default:                                   \
      return cudaErrorInvalidValue;            \
  }

// F<T, P>(args...) for x dtype T and parameter dtype P (T, or float32 for 16-bit T).
#define FASTGPT_DISPATCH_X_PARAM(x_dtype, p_dtype, F, ...)                                           \
  do {                                                                                               \
    if (!valid_param_dtype((x_dtype), (p_dtype))) return cudaErrorInvalidValue;                     \
    const bool p32 = (p_dtype) == FG_FLOAT32;                                                        \
    switch (x_dtype) {                                                                               \
      case FG_FLOAT32: return F<float, float>(__VA_ARGS__);                                          \
      case FG_FLOAT16: return p32 ? F<__half, float>(__VA_ARGS__) : F<__half, __half>(__VA_ARGS__); \
      case FG_BFLOAT16:                                                                              \
        return p32 ? F<__nv_bfloat16, float>(__VA_ARGS__) : F<__nv_bfloat16, __nv_bfloat16>(__VA_ARGS__); \
      default: return cudaErrorInvalidValue;                                                         \
    }                                                                                                \
  } while (0)
