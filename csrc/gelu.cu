// GELU and bias + GELU, forward and backward (the `cuda` backend of fastgpt.gelu / fastgpt.bias_gelu).
// C entry points: fastgpt_cuda.h.
//
// Memory-bound elementwise kernels: 16-byte packs when every pointer is aligned (GELU handles a
// ragged tail of fewer than a pack separately; bias + GELU also needs the row length to be a
// multiple of the pack), a scalar path otherwise; float32 math (erff / tanhf: the fast
// approximations are not accurate enough for float32 parity); grid-stride loops.
//
// bias + GELU maps threads to (column pack, row): each thread loads its bias pack once and walks
// down the rows, so the backward accumulates dbias for its columns in registers (float32, before dx
// is rounded) and each block writes one partial row; launch_column_sums adds the partial rows in a
// fixed order (deterministic, no atomics).
#include "common.cuh"

namespace fastgpt {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr float kTanhCoef = 0.044715f;
constexpr int kThreads = 256;

__device__ __forceinline__ float gelu(float x, bool tanh_form) {
  if (tanh_form) {
    const float t = tanhf(kSqrt2OverPi * (x + kTanhCoef * x * x * x));
    return 0.5f * x * (1.f + t);
  }
  return 0.5f * x * (1.f + erff(x * kInvSqrt2));
}

__device__ __forceinline__ float gelu_grad(float x, bool tanh_form) {
  if (tanh_form) {
    const float t = tanhf(kSqrt2OverPi * (x + kTanhCoef * x * x * x));
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kTanhCoef * x * x);
  }
  return 0.5f * (1.f + erff(x * kInvSqrt2)) + x * expf(-0.5f * x * x) * kInvSqrt2Pi;
}

// out = gelu(x) (forward) or dy * gelu'(x) (backward) for VEC elements at p.
template <typename T, int VEC, bool BWD>
__device__ __forceinline__ void gelu_pack(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out,
                                          int64_t i, bool tanh_form) {
  float v[VEC];
  load_pack<T, VEC>(x + i, v);
  if (BWD) {
    float g[VEC];
    load_pack<T, VEC>(dy + i, g);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = g[j] * gelu_grad(v[j], tanh_form);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = gelu(v[j], tanh_form);
  }
  store_pack<T, VEC>(out + i, v);
}

template <typename T, int VEC, bool BWD>
__global__ void __launch_bounds__(kThreads) gelu_kernel(const FgGeluArgs a) {
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  T* __restrict__ out = static_cast<T*>(a.out);
  const bool tanh_form = a.approximate == FG_GELU_TANH;
  const int64_t n = a.rows * a.cols;
  const int64_t packs = n / VEC;
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  for (int64_t i = t; i < packs; i += (int64_t)gridDim.x * blockDim.x) gelu_pack<T, VEC, BWD>(x, dy, out, i * VEC, tanh_form);
  if (VEC > 1 && packs * VEC + t < n) gelu_pack<T, 1, BWD>(x, dy, out, packs * VEC + t, tanh_form);  // ragged tail
}

template <typename T, typename B, int VEC, bool BWD>
__global__ void __launch_bounds__(kThreads) bias_gelu_kernel(const FgGeluArgs a, float* partial) {
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  const B* __restrict__ bias = static_cast<const B*>(a.bias);
  T* __restrict__ out = static_cast<T*>(a.out);
  const bool tanh_form = a.approximate == FG_GELU_TANH;
  const int64_t cols = a.cols;
  const int64_t c = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  const bool col_ok = c < cols;
  float bv[VEC], acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
  if (col_ok) {
    load_pack<B, VEC>(bias + c, bv);
    for (int64_t r = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; r < a.rows; r += (int64_t)gridDim.y * blockDim.y) {
      const int64_t off = r * cols + c;
      float v[VEC];
      load_pack<T, VEC>(x + off, v);
      if (BWD) {
        float g[VEC];
        load_pack<T, VEC>(dy + off, g);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          v[j] = g[j] * gelu_grad(v[j] + bv[j], tanh_form);
          acc[j] += v[j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = gelu(v[j] + bv[j], tanh_form);
      }
      store_pack<T, VEC>(out + off, v);
    }
  }
  if (!BWD) return;
  // dbias partial row blockIdx.y: the blockDim.y row slices of each column, added in a fixed order
  FASTGPT_SHARED(float, comb, kThreads * VEC);
  const int bx = blockDim.x;
#pragma unroll
  for (int j = 0; j < VEC; ++j) comb[(threadIdx.y * VEC + j) * bx + threadIdx.x] = acc[j];
  __syncthreads();
  if (threadIdx.y == 0 && col_ok) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float s = 0.f;
      for (int k = 0; k < (int)blockDim.y; ++k) s += comb[(k * VEC + j) * bx + threadIdx.x];
      partial[(int64_t)blockIdx.y * cols + c + j] = s;
    }
  }
}

bool gelu_vectorizable(const FgGeluArgs& a) {
  return aligned(a.x, 16) && aligned(a.dy, 16) && aligned(a.out, 16);
}

template <typename T, bool BWD>
cudaError_t gelu_typed(const FgGeluArgs& a, cudaStream_t stream) {
  const bool vector = gelu_vectorizable(a);
  const int64_t packs = a.rows * a.cols / (vector ? vec_of<T>() : 1);
  const int64_t grid = min64(ceil_div(packs > 0 ? packs : 1, kThreads), resident_blocks(device_limits(), kThreads));
  if (vector) {
    FASTGPT_LAUNCH(static_cast<unsigned>(grid), kThreads, 0, stream, gelu_kernel<T, vec_of<T>(), BWD>)(a);
  } else {
    FASTGPT_LAUNCH(static_cast<unsigned>(grid), kThreads, 0, stream, gelu_kernel<T, 1, BWD>)(a);
  }
  return cudaGetLastError();
}

struct BiasPlan {
  int vec;
  dim3 block;
  dim3 grid;
};

// Blocks of 256 threads: blockDim.x column packs (32..256) x blockDim.y row slices; the grid covers
// the columns once and, down the rows, fills the device (forward) or 4 blocks per SM (backward: each
// block writes one float32 partial row of dbias, 2 * rows_of_partials * cols * 4 bytes in all, so
// fewer, longer-running blocks keep that small against the 3 * rows * cols * 2 bytes of the op).
template <typename T, typename B>
BiasPlan bias_plan(const FgGeluArgs& a, bool bwd) {
  BiasPlan p;
  const bool vector = a.cols % vec_of<T>() == 0 && gelu_vectorizable(a) && aligned(a.bias, 16);
  p.vec = vector ? vec_of<T>() : 1;
  const int64_t packs = a.cols / p.vec;
  int bx = next_pow2(packs);
  bx = bx < 32 ? 32 : (bx > kThreads ? kThreads : bx);
  p.block = dim3(bx, kThreads / bx);
  const int64_t gx = ceil_div(packs, bx);
  const DeviceLimits d = device_limits();
  const int64_t fill = bwd ? (int64_t)d.sms * 4 : resident_blocks(d, kThreads);
  const int64_t gy = min64(min64(ceil_div(a.rows, p.block.y), fill > gx ? fill / gx : 1), 65535);
  p.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  return p;
}

template <typename T, typename B, bool BWD>
cudaError_t bias_gelu_typed(const FgGeluArgs& a, cudaStream_t stream) {
  const BiasPlan p = bias_plan<T, B>(a, BWD);
  float* partial = BWD ? static_cast<float*>(a.workspace) : nullptr;
  if (p.vec == 1) {
    FASTGPT_LAUNCH(p.grid, p.block, 0, stream, bias_gelu_kernel<T, B, 1, BWD>)(a, partial);
  } else {
    FASTGPT_LAUNCH(p.grid, p.block, 0, stream, bias_gelu_kernel<T, B, vec_of<T>(), BWD>)(a, partial);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !BWD) return err;
  return launch_column_sums(partial, nullptr, p.grid.y, a.cols, a.dbias, nullptr, a.bias_dtype, stream);
}

template <typename T, typename B>
cudaError_t bias_gelu_fwd_typed(const FgGeluArgs& a, cudaStream_t stream) {
  return bias_gelu_typed<T, B, false>(a, stream);
}

template <typename T, typename B>
cudaError_t bias_gelu_bwd_typed(const FgGeluArgs& a, cudaStream_t stream) {
  return bias_gelu_typed<T, B, true>(a, stream);
}

template <typename T, typename B>
cudaError_t bias_workspace_typed(const FgGeluArgs& a, size_t* bytes) {
  *bytes = static_cast<size_t>(bias_plan<T, B>(a, true).grid.y) * static_cast<size_t>(a.cols) * sizeof(float);
  return cudaSuccess;
}

bool args_ok(const FgGeluArgs& a, bool bwd, bool with_bias) {
  if (a.rows < 0 || a.cols < 1 || !valid_dtype(a.dtype) || a.x == nullptr || a.out == nullptr) return false;
  if (a.approximate != FG_GELU_ERF && a.approximate != FG_GELU_TANH) return false;
  if (bwd && a.dy == nullptr) return false;
  if (with_bias && a.bias == nullptr) return false;
  if (with_bias && bwd && (a.dbias == nullptr || a.workspace == nullptr)) return false;
  return true;
}

}  // namespace
}  // namespace fastgpt

using namespace fastgpt;

FASTGPT_API int fastgpt_gelu_fwd(const FgGeluArgs* args, cudaStream_t stream) {
  if (!args_ok(*args, false, false)) return cudaErrorInvalidValue;
  if (args->rows == 0) return cudaSuccess;
  FASTGPT_DISPATCH_DTYPE(args->dtype, T, return gelu_typed<T, false>(*args, stream));
}

FASTGPT_API int fastgpt_gelu_bwd(const FgGeluArgs* args, cudaStream_t stream) {
  if (!args_ok(*args, true, false)) return cudaErrorInvalidValue;
  if (args->rows == 0) return cudaSuccess;
  FASTGPT_DISPATCH_DTYPE(args->dtype, T, return gelu_typed<T, true>(*args, stream));
}

FASTGPT_API int fastgpt_bias_gelu_fwd(const FgGeluArgs* args, cudaStream_t stream) {
  if (!args_ok(*args, false, true)) return cudaErrorInvalidValue;
  if (args->rows == 0) return cudaSuccess;
  FASTGPT_DISPATCH_X_PARAM(args->dtype, args->bias_dtype, bias_gelu_fwd_typed, *args, stream);
}

FASTGPT_API size_t fastgpt_bias_gelu_bwd_workspace_size(const FgGeluArgs* args) {
  const FgGeluArgs& a = *args;
  if (a.rows <= 0 || a.cols < 1 || !valid_param_dtype(a.dtype, a.bias_dtype)) return 0;
  size_t bytes = 0;
  const auto get = [&]() -> cudaError_t {
    FASTGPT_DISPATCH_X_PARAM(a.dtype, a.bias_dtype, bias_workspace_typed, a, &bytes);
  };
  return get() == cudaSuccess ? bytes : 0;
}

FASTGPT_API int fastgpt_bias_gelu_bwd(const FgGeluArgs* args, cudaStream_t stream) {
  if (!args_ok(*args, true, true)) return cudaErrorInvalidValue;
  if (args->rows == 0) return cudaSuccess;  // the caller zero-fills dbias of an empty batch
  FASTGPT_DISPATCH_X_PARAM(args->dtype, args->bias_dtype, bias_gelu_bwd_typed, *args, stream);
}
