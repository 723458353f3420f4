// Layer norm and residual-add + layer norm, forward and backward (the `cuda` backend of
// fastgpt.layer_norm / fastgpt.add_layer_norm). C entry points: fastgpt_cuda.h.
//
// Forward: a row lives in registers (VPT packs of VEC elements per thread, kept in x's dtype, blockDim.x
// threads per row, blockDim.y rows per block), so x (and the residual) is read from memory once;
// mean and the variance are two passes over the registers (no E[x^2] - E[x]^2 cancellation); mean
// and rstd are saved in float32. Rows of up to 32 threads share warps and reduce with shuffles
// only; wider rows take several warps and one shared-memory step. Rows too wide for registers
// (> 16384 float32 or 32768 16-bit elements) take a multi-pass kernel that re-reads the row (from L2).
//
// Backward: one read of x and dy per row, dx written once, and each block accumulates its rows'
// dweight/dbias contributions in registers, then writes one float32 partial row; a small second
// kernel sums the partial rows in a fixed order (deterministic, no atomics). Rows wider than the
// registers hold (> 8192 elements) take a two-pass dx kernel and a column-tiled dweight/dbias
// kernel instead.
//
// Every kernel loops over rows with a grid stride (any row count: the grid is capped at what the
// device holds at once) and takes a 16-byte vectorised path when every pointer is aligned and the
// row length is a multiple of the pack, else a scalar path (misaligned views, odd sizes).
#include "common.cuh"

namespace fastgpt {
namespace {

// Register budgets (checked with nvcc --resource-usage: no spills on sm_80 / sm_90):
//  forward: 4 packs of x per thread, kept in x's dtype (16 registers), up to 1024 threads (64 registers);
//  backward: x and dy packs plus float32 dweight/dbias accumulators for 16 columns, blocks of 512
//  threads (128 registers); the scalar paths: 8 elements per thread, 1024 threads.
constexpr int kFwdMaxThreads = 1024;
constexpr int kBwdMaxThreads = 512;
constexpr int kFwdVpt = 4;
constexpr int kBwdMaxElemsPerThread = 16;
constexpr int kScalarVpt = 8;
constexpr int kMinBlockThreads = 128;  // forward: rows of fewer threads share a block
constexpr int kBigThreads = 512;       // threads per row of the multi-pass kernels

// ---- forward -----------------------------------------------------------------------------------

template <typename T, typename P, int VEC, int VPT>
__global__ void __launch_bounds__(kFwdMaxThreads, 1) layer_norm_fwd_kernel(const FgLayerNormFwdArgs a) {
  const P* __restrict__ w = static_cast<const P*>(a.weight);
  const P* __restrict__ b = static_cast<const P*>(a.bias);
  const int n = static_cast<int>(a.cols);  // < 2^24 (checked by the entry points): 32-bit column math
  const float fn = static_cast<float>(n);
  const float eps = static_cast<float>(a.eps);
  const int tpr = blockDim.x;
  const int tx = threadIdx.x;
  RowReducer<1> red;

  for (int64_t first = (int64_t)blockIdx.x * blockDim.y; first < a.rows; first += (int64_t)gridDim.x * blockDim.y) {
    const int64_t row = first + threadIdx.y;
    const bool active = row < a.rows;
    const int64_t off = row * n;
    const T* __restrict__ x = static_cast<const T*>(a.x) + off;
    const T* __restrict__ res = a.residual != nullptr ? static_cast<const T*>(a.residual) + off : nullptr;
    Pack<T, VEC> v[VPT];  // the row (x, or the rounded x + residual) in x's dtype
    float acc[1] = {0.f};
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int c = (i * tpr + tx) * VEC;
      v[i] = Pack<T, VEC>{};
      if (active && c < n) {
        if (res == nullptr) {
          v[i] = load_raw<T, VEC>(x + c);
        } else {
          float s[VEC], r[VEC];
          load_pack<T, VEC>(x + c, s);
          load_pack<T, VEC>(res + c, r);
#pragma unroll
          for (int j = 0; j < VEC; ++j) s[j] += r[j];
          v[i] = to_pack<T, VEC>(s);
          store_raw<T, VEC>(static_cast<T*>(a.sum) + off + c, v[i]);
        }
        float f[VEC];
        unpack<T, VEC>(v[i], f);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[0] += f[j];
      }
    }
    red.allreduce(acc);
    const float mean = acc[0] / fn;

    acc[0] = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int c = (i * tpr + tx) * VEC;
      if (active && c < n) {
        float f[VEC];
        unpack<T, VEC>(v[i], f);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = f[j] - mean;
          acc[0] += d * d;
        }
      }
    }
    red.allreduce(acc);
    const float rstd = rsqrtf(acc[0] / fn + eps);
    if (active && tx == 0) {
      a.mean[row] = mean;
      a.rstd[row] = rstd;
    }

    T* __restrict__ y = static_cast<T*>(a.y) + off;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int c = (i * tpr + tx) * VEC;
      if (active && c < n) {
        float f[VEC], wv[VEC], bv[VEC];
        unpack<T, VEC>(v[i], f);
        load_param<P, VEC>(w, c, 1.f, wv);
        load_param<P, VEC>(b, c, 0.f, bv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) f[j] = (f[j] - mean) * rstd * wv[j] + bv[j];
        store_pack<T, VEC>(y + c, f);
      }
    }
  }
}

// Rows wider than the registers hold: one block per row, three passes (sum, squared deviations,
// output); the second and third read the row again, from L2. With a residual the first pass
// writes the rounded sum, which the later passes read back (each thread its own elements).
template <typename T, typename P, int VEC>
__global__ void __launch_bounds__(kBigThreads) layer_norm_fwd_big_kernel(const FgLayerNormFwdArgs a) {
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ res = static_cast<const T*>(a.residual);
  const P* __restrict__ w = static_cast<const P*>(a.weight);
  const P* __restrict__ b = static_cast<const P*>(a.bias);
  T* __restrict__ y = static_cast<T*>(a.y);
  T* sum = static_cast<T*>(a.sum);
  const int64_t n = a.cols;
  const float fn = static_cast<float>(n);
  const int64_t step = (int64_t)blockDim.x * VEC;
  const int64_t start = (int64_t)threadIdx.x * VEC;
  RowReducer<1> red;

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t off = row * n;
    const T* src = res != nullptr ? sum + off : x + off;
    float acc[1] = {0.f};
    for (int64_t c = start; c < n; c += step) {
      float v[VEC];
      load_pack<T, VEC>(x + off + c, v);
      if (res != nullptr) {
        float r[VEC];
        load_pack<T, VEC>(res + off + c, r);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = round_to<T>(v[j] + r[j]);
        store_pack<T, VEC>(sum + off + c, v);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[0] += v[j];
    }
    red.allreduce(acc);
    const float mean = acc[0] / fn;

    acc[0] = 0.f;
    for (int64_t c = start; c < n; c += step) {
      float v[VEC];
      load_pack<T, VEC>(src + c, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = v[j] - mean;
        acc[0] += d * d;
      }
    }
    red.allreduce(acc);
    const float rstd = rsqrtf(acc[0] / fn + static_cast<float>(a.eps));
    if (threadIdx.x == 0) {
      a.mean[row] = mean;
      a.rstd[row] = rstd;
    }

    for (int64_t c = start; c < n; c += step) {
      float v[VEC], wv[VEC], bv[VEC];
      load_pack<T, VEC>(src + c, v);
      load_param<P, VEC>(w, c, 1.f, wv);
      load_param<P, VEC>(b, c, 0.f, bv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = (v[j] - mean) * rstd * wv[j] + bv[j];
      store_pack<T, VEC>(y + off + c, v);
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------

// Threads per block of the register-resident backward (one block per SM: its registers fill it).
template <int VEC>
__host__ __device__ constexpr int bwd_block_threads() {
  return VEC == 1 ? kFwdMaxThreads : kBwdMaxThreads;
}

// Writes this block's dweight/dbias partial row. The blockDim.y rows of the block (a power of two)
// fold pairwise through shared memory, log2(blockDim.y) steps in a fixed order (deterministic):
// at each step rows [h, 2h) hand their sums to rows [0, h). Called by every thread of the block.
template <int VEC, int VPT>
__device__ __forceinline__ void write_param_partials(float (&accw)[VPT][VEC], float (&accb)[VPT][VEC], float* pw,
                                                     float* pb, int n) {
  const int tpr = blockDim.x;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int row_cols = tpr * VPT * VEC;  // the columns a row's threads hold (>= n)
  // at most half the block's threads hand over at once: (blockDim.y / 2) * row_cols floats
  constexpr int kCols = bwd_block_threads<VEC>() / 2 * VPT * VEC;
  FASTGPT_SHARED(float, comb, 2 * kCols);
  for (int h = blockDim.y / 2; h >= 1; h /= 2) {
    if (ty >= h && ty < 2 * h) {
      float* slot = comb + (ty - h) * row_cols;
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          slot[(i * tpr + tx) * VEC + j] = accw[i][j];
          slot[kCols + (i * tpr + tx) * VEC + j] = accb[i][j];
        }
      }
    }
    __syncthreads();
    if (ty < h) {
      const float* slot = comb + ty * row_cols;
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          accw[i][j] += slot[(i * tpr + tx) * VEC + j];
          accb[i][j] += slot[kCols + (i * tpr + tx) * VEC + j];
        }
      }
    }
    __syncthreads();
  }
  if (ty != 0) return;
  float* outw = pw != nullptr ? pw + (int64_t)blockIdx.x * n : nullptr;
  float* outb = pb != nullptr ? pb + (int64_t)blockIdx.x * n : nullptr;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int c = (i * tpr + tx) * VEC;
    if (c < n) {  // n is a multiple of VEC: whole packs (16-byte aligned float stores when VEC > 1)
      if (outw != nullptr) store_raw<float, VEC>(outw + c, to_pack<float, VEC>(accw[i]));
      if (outb != nullptr) store_raw<float, VEC>(outb + c, to_pack<float, VEC>(accb[i]));
    }
  }
}

// The per-pack math of the backward, shared by the register-resident and the multi-pass kernels.
// With g = dy * weight and xhat = (x - mean) * rstd: the row sums of g and g * xhat,
template <int VEC>
__device__ __forceinline__ void ln_bwd_row_sums(const float (&xv)[VEC], const float (&gv)[VEC], const float (&wv)[VEC],
                                                float mean, float rstd, float (&acc)[2]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float gw = gv[j] * wv[j];
    acc[0] += gw;
    acc[1] += gw * (xv[j] - mean) * rstd;
  }
}

// and, from their means, dx = dsum + rstd * (g - mean(g) - xhat * mean(g * xhat)) (dsum: add + layer
// norm's gradient of the sum, or none).
template <typename T, int VEC>
__device__ __forceinline__ void ln_bwd_dx(const float (&xv)[VEC], const float (&gv)[VEC], const float (&wv)[VEC],
                                          const T* __restrict__ dsum, float mean, float rstd, float mean_g,
                                          float mean_gx, float (&o)[VEC]) {
  if (dsum != nullptr) {
    load_pack<T, VEC>(dsum, o);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = 0.f;
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) o[j] += rstd * (gv[j] * wv[j] - mean_g - (xv[j] - mean) * rstd * mean_gx);
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight, xhat = (x - mean) * rstd;
// plus dsum when given. pw/pb (gridDim.x rows of n floats) get the block's dweight/dbias partials.
// (The scalar path holds 8 elements per thread and may take up to 1024 threads per row.)
template <typename T, typename P, int VEC, int VPT>
__global__ void __launch_bounds__(bwd_block_threads<VEC>(), 1) layer_norm_bwd_kernel(const FgLayerNormBwdArgs a, float* pw, float* pb) {
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const P* __restrict__ w = static_cast<const P*>(a.weight);
  const T* __restrict__ dsum = static_cast<const T*>(a.dsum);
  T* __restrict__ dx = static_cast<T*>(a.dx);
  const int64_t n = a.cols;
  const float fn = static_cast<float>(n);
  const int tpr = blockDim.x;
  const int tx = threadIdx.x;
  RowReducer<2> red;

  float accw[VPT][VEC], accb[VPT][VEC];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) accw[i][j] = accb[i][j] = 0.f;
  }

  for (int64_t first = (int64_t)blockIdx.x * blockDim.y; first < a.rows; first += (int64_t)gridDim.x * blockDim.y) {
    const int64_t row = first + threadIdx.y;
    const bool active = row < a.rows;
    const int64_t off = row * n;
    const float mean = active ? a.mean[row] : 0.f;
    const float rstd = active ? a.rstd[row] : 0.f;
    Pack<T, VEC> xr[VPT], gr[VPT];  // x and dy, in their dtype
    float acc[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t c = ((int64_t)i * tpr + tx) * VEC;
      xr[i] = gr[i] = Pack<T, VEC>{};
      if (active && c < n) {
        float xv[VEC], gv[VEC], wv[VEC];
        xr[i] = load_raw<T, VEC>(x + off + c);
        gr[i] = load_raw<T, VEC>(dy + off + c);
        load_param<P, VEC>(w, c, 1.f, wv);
        unpack<T, VEC>(xr[i], xv);
        unpack<T, VEC>(gr[i], gv);
        ln_bwd_row_sums<VEC>(xv, gv, wv, mean, rstd, acc);
      }
    }
    red.allreduce(acc);
    const float mean_g = acc[0] / fn;
    const float mean_gx = acc[1] / fn;

#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t c = ((int64_t)i * tpr + tx) * VEC;
      if (active && c < n) {
        float xv[VEC], gv[VEC], wv[VEC], o[VEC];
        unpack<T, VEC>(xr[i], xv);
        unpack<T, VEC>(gr[i], gv);
        load_param<P, VEC>(w, c, 1.f, wv);
        ln_bwd_dx<T, VEC>(xv, gv, wv, dsum != nullptr ? dsum + off + c : nullptr, mean, rstd, mean_g, mean_gx, o);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          accw[i][j] += gv[j] * ((xv[j] - mean) * rstd);
          accb[i][j] += gv[j];
        }
        store_pack<T, VEC>(dx + off + c, o);
      }
    }
  }
  if (pw != nullptr || pb != nullptr) write_param_partials<VEC, VPT>(accw, accb, pw, pb, static_cast<int>(a.cols));
}

// dx for rows wider than the registers hold: one block per row, two passes (sums, then dx).
template <typename T, typename P, int VEC>
__global__ void __launch_bounds__(kBigThreads) layer_norm_bwd_big_kernel(const FgLayerNormBwdArgs a) {
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const P* __restrict__ w = static_cast<const P*>(a.weight);
  const T* __restrict__ dsum = static_cast<const T*>(a.dsum);
  T* __restrict__ dx = static_cast<T*>(a.dx);
  const int64_t n = a.cols;
  const float fn = static_cast<float>(n);
  const int64_t step = (int64_t)blockDim.x * VEC;
  const int64_t start = (int64_t)threadIdx.x * VEC;
  RowReducer<2> red;

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t off = row * n;
    const float mean = a.mean[row];
    const float rstd = a.rstd[row];
    float acc[2] = {0.f, 0.f};
    for (int64_t c = start; c < n; c += step) {
      float xv[VEC], gv[VEC], wv[VEC];
      load_pack<T, VEC>(x + off + c, xv);
      load_pack<T, VEC>(dy + off + c, gv);
      load_param<P, VEC>(w, c, 1.f, wv);
      ln_bwd_row_sums<VEC>(xv, gv, wv, mean, rstd, acc);
    }
    red.allreduce(acc);
    const float mean_g = acc[0] / fn;
    const float mean_gx = acc[1] / fn;
    for (int64_t c = start; c < n; c += step) {
      float xv[VEC], gv[VEC], wv[VEC], o[VEC];
      load_pack<T, VEC>(x + off + c, xv);
      load_pack<T, VEC>(dy + off + c, gv);
      load_param<P, VEC>(w, c, 1.f, wv);
      ln_bwd_dx<T, VEC>(xv, gv, wv, dsum != nullptr ? dsum + off + c : nullptr, mean, rstd, mean_g, mean_gx, o);
      store_pack<T, VEC>(dx + off + c, o);
    }
  }
}

constexpr int kColThreadsX = 32;
constexpr int kColThreadsY = 8;

// dweight/dbias partials for rows wider than the registers hold: block (bx, by) owns 32 columns and
// the rows by*8 + ty (stride gridDim.y*8); its 8 row slices combine in shared memory in a fixed
// order into partial row `by`.
template <typename T>
__global__ void __launch_bounds__(kColThreadsX * kColThreadsY) layer_norm_bwd_params_kernel(const FgLayerNormBwdArgs a, float* pw, float* pb) {
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const int64_t n = a.cols;
  const int64_t c = (int64_t)blockIdx.x * kColThreadsX + threadIdx.x;
  float sw = 0.f, sb = 0.f;
  if (c < n) {
    for (int64_t row = (int64_t)blockIdx.y * kColThreadsY + threadIdx.y; row < a.rows; row += (int64_t)gridDim.y * kColThreadsY) {
      const float g = to_float(dy[row * n + c]);
      sw += g * (to_float(x[row * n + c]) - a.mean[row]) * a.rstd[row];
      sb += g;
    }
  }
  FASTGPT_SHARED(float, buf, 2 * kColThreadsY * kColThreadsX);
  buf[threadIdx.y * kColThreadsX + threadIdx.x] = sw;
  buf[(kColThreadsY + threadIdx.y) * kColThreadsX + threadIdx.x] = sb;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    float tw = 0.f, tb = 0.f;
    for (int k = 0; k < kColThreadsY; ++k) {
      tw += buf[k * kColThreadsX + threadIdx.x];
      tb += buf[(kColThreadsY + k) * kColThreadsX + threadIdx.x];
    }
    if (pw != nullptr) pw[(int64_t)blockIdx.y * n + c] = tw;
    if (pb != nullptr) pb[(int64_t)blockIdx.y * n + c] = tb;
  }
}

// out_k[c] = sum over partial rows, for k = blockIdx.y (0: partial0/out0, 1: partial1/out1).
template <typename G>
__global__ void __launch_bounds__(kColThreadsX * kColThreadsY) column_sums_kernel(const float* __restrict__ p0, const float* __restrict__ p1,
                                                                                 int64_t prows, int64_t n, G* out0, G* out1) {
  const float* __restrict__ p = blockIdx.y == 0 ? p0 : p1;
  G* out = blockIdx.y == 0 ? out0 : out1;
  if (out == nullptr) return;  // the whole block: no barrier is skipped by part of it
  const int64_t c = (int64_t)blockIdx.x * kColThreadsX + threadIdx.x;
  float s = 0.f;
  if (c < n) {
    for (int64_t r = threadIdx.y; r < prows; r += kColThreadsY) s += p[r * n + c];
  }
  FASTGPT_SHARED(float, buf, kColThreadsY * kColThreadsX);
  buf[threadIdx.y * kColThreadsX + threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    float t = 0.f;
    for (int k = 0; k < kColThreadsY; ++k) t += buf[k * kColThreadsX + threadIdx.x];
    out[c] = from_float<G>(t);
  }
}

// ---- launch plans ----------------------------------------------------------------------------------

struct RowPlan {
  int vec;  // elements per pack
  int vpt;  // packs per thread (a compile-time class); 0 = the row does not fit: multi-pass kernels
  int tpr;  // threads per row
  int rows_per_block;
};

// Threads per row: a power of two such that each thread holds `preferred` packs (4 on the vector
// paths, 2 for 16-bit backward, 8 on the scalar paths; rows of a few packs share a warp), up to
// max_tpr threads; wider rows take the multi-pass kernels. Packs past the end of the row are
// masked (fewer than half of a thread's packs, unless the row is tiny).
RowPlan plan_rows(int64_t cols, int vec, int max_vpt, int max_tpr) {
  RowPlan p{vec, 0, kBigThreads, 1};
  const int64_t packs = ceil_div(cols, vec);
  if (vec == 1) max_vpt = kScalarVpt;
  const int preferred = max_vpt < 4 || vec == 1 ? max_vpt : 4;
  if (packs > (int64_t)max_tpr * max_vpt) return p;
  p.tpr = next_pow2(ceil_div(packs, preferred));
  p.vpt = preferred;
  if (p.tpr > max_tpr) {
    p.tpr = max_tpr;
    p.vpt = max_vpt;
  }
  p.rows_per_block = p.tpr >= kMinBlockThreads ? 1 : kMinBlockThreads / p.tpr;
  return p;
}

template <typename T, typename P>
bool fwd_vectorizable(const FgLayerNormFwdArgs& a) {
  return a.cols % vec_of<T>() == 0 && aligned(a.x, 16) && aligned(a.residual, 16) && aligned(a.y, 16) &&
         aligned(a.sum, 16) && aligned(a.weight, 16) && aligned(a.bias, 16);
}

template <typename T, typename P>
bool bwd_vectorizable(const FgLayerNormBwdArgs& a) {
  return a.cols % vec_of<T>() == 0 && aligned(a.x, 16) && aligned(a.dy, 16) && aligned(a.dx, 16) &&
         aligned(a.dsum, 16) && aligned(a.weight, 16);
}

template <typename T, typename P>
RowPlan fwd_plan(const FgLayerNormFwdArgs& a) {
  const int vec = fwd_vectorizable<T, P>(a) ? vec_of<T>() : 1;
  return plan_rows(a.cols, vec, kFwdVpt, kFwdMaxThreads);
}

// The backward gives each block as many rows as fill bwd_block_threads and launches one block per
// SM (its registers fill the SM), so the float32 partial rows (one per block, written then summed
// by column_sums_kernel) cost 2 * 2 * SMs * N * 4 bytes: ~8% over the 3 * M * N * 2 bytes of a
// bfloat16 backward at M = 4096 rows, ~0.5% at 65536.
template <typename T, typename P>
RowPlan bwd_plan(const FgLayerNormBwdArgs& a) {
  const int vec = bwd_vectorizable<T, P>(a) ? vec_of<T>() : 1;
  const int block = vec == 1 ? kFwdMaxThreads : kBwdMaxThreads;  // bwd_block_threads<VEC>()
  RowPlan p = plan_rows(a.cols, vec, kBwdMaxElemsPerThread / vec, block);
  if (p.vpt != 0) p.rows_per_block = block / p.tpr;
  return p;
}

// The grid of a grid-stride row kernel: one block per row group, at most what the device holds.
int64_t row_grid(const RowPlan& p, int64_t rows) {
  const int threads = p.tpr * p.rows_per_block;
  return min64(ceil_div(rows, p.rows_per_block), resident_blocks(device_limits(), threads));
}

// Partial rows of the dweight/dbias reduction and the grid of the big-row params kernel.
struct BwdShape {
  RowPlan plan;
  int64_t grid;          // blocks of the dx kernel
  int64_t param_grid_x;  // big rows: column blocks of the params kernel
  int64_t partial_rows;  // rows of each float32 partial buffer
};

template <typename T, typename P>
BwdShape bwd_shape(const FgLayerNormBwdArgs& a) {
  BwdShape s{bwd_plan<T, P>(a), 0, 0, 0};
  if (s.plan.vpt != 0) {
    s.grid = min64(ceil_div(a.rows, s.plan.rows_per_block), device_limits().sms);
    s.partial_rows = s.grid;
  } else {
    s.grid = row_grid(s.plan, a.rows);
    s.param_grid_x = ceil_div(a.cols, kColThreadsX);
    const int64_t fill = resident_blocks(device_limits(), kColThreadsX * kColThreadsY);
    int64_t gy = min64(ceil_div(a.rows, kColThreadsY), fill > s.param_grid_x ? fill / s.param_grid_x : 1);
    s.partial_rows = min64(gy, 65535);
  }
  return s;
}

// ---- dispatch --------------------------------------------------------------------------------------

template <typename T, typename P>
cudaError_t layer_norm_fwd_typed(const FgLayerNormFwdArgs& a, cudaStream_t stream) {
  const RowPlan p = fwd_plan<T, P>(a);
  const dim3 block(p.tpr, p.rows_per_block);
  const unsigned grid = static_cast<unsigned>(row_grid(p, a.rows));
  constexpr int V = vec_of<T>();
  if (p.vpt == 0) {
    if (p.vec == 1) {
      FASTGPT_LAUNCH(grid, block, 0, stream, layer_norm_fwd_big_kernel<T, P, 1>)(a);
    } else {
      FASTGPT_LAUNCH(grid, block, 0, stream, layer_norm_fwd_big_kernel<T, P, V>)(a);
    }
  } else if (p.vec == 1) {
    FASTGPT_LAUNCH(grid, block, 0, stream, layer_norm_fwd_kernel<T, P, 1, kScalarVpt>)(a);
  } else {
    FASTGPT_LAUNCH(grid, block, 0, stream, layer_norm_fwd_kernel<T, P, V, kFwdVpt>)(a);
  }
  return cudaGetLastError();
}

template <typename T, typename P>
cudaError_t layer_norm_bwd_typed(const FgLayerNormBwdArgs& a, cudaStream_t stream) {
  const BwdShape s = bwd_shape<T, P>(a);
  const RowPlan& p = s.plan;
  float* pw = nullptr;
  float* pb = nullptr;
  {
    float* ws = static_cast<float*>(a.workspace);
    if (a.dweight != nullptr) {
      pw = ws;
      ws += s.partial_rows * a.cols;
    }
    if (a.dbias != nullptr) pb = ws;
  }
  const dim3 block(p.tpr, p.rows_per_block);
  const unsigned grid = static_cast<unsigned>(s.grid);
  constexpr int V = vec_of<T>();
  if (p.vpt == 0) {
    if (p.vec == 1) {
      FASTGPT_LAUNCH(grid, block, 0, stream, layer_norm_bwd_big_kernel<T, P, 1>)(a);
    } else {
      FASTGPT_LAUNCH(grid, block, 0, stream, layer_norm_bwd_big_kernel<T, P, V>)(a);
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    if (pw != nullptr || pb != nullptr) {
      const dim3 pgrid(static_cast<unsigned>(s.param_grid_x), static_cast<unsigned>(s.partial_rows));
      FASTGPT_LAUNCH(pgrid, dim3(kColThreadsX, kColThreadsY), 0, stream, layer_norm_bwd_params_kernel<T>)(a, pw, pb);
    }
  } else if (p.vec == 1) {
    FASTGPT_LAUNCH(grid, block, 0, stream, layer_norm_bwd_kernel<T, P, 1, kScalarVpt>)(a, pw, pb);
  } else {
    // kBwdMaxElemsPerThread per thread: 4 packs of float32, 2 packs of 16-bit types
    FASTGPT_LAUNCH(grid, block, 0, stream, layer_norm_bwd_kernel<T, P, V, kBwdMaxElemsPerThread / V>)(a, pw, pb);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || (pw == nullptr && pb == nullptr)) return err;
  return launch_column_sums(pw, pb, s.partial_rows, a.cols, a.dweight, a.dbias, a.grad_dtype, stream);
}

template <typename T, typename P>
size_t bwd_workspace_typed(const FgLayerNormBwdArgs& a) {
  const BwdShape s = bwd_shape<T, P>(a);
  const int64_t buffers = (a.dweight != nullptr) + (a.dbias != nullptr);
  return static_cast<size_t>(buffers * s.partial_rows * a.cols) * sizeof(float);
}

bool shape_ok(int64_t rows, int64_t cols) { return rows >= 0 && cols >= 1 && cols <= (int64_t(1) << 24); }

}  // namespace

cudaError_t launch_column_sums(const float* partial0, const float* partial1, int64_t partial_rows, int64_t cols,
                               void* out0, void* out1, int64_t out_dtype, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(cols, kColThreadsX)), 2);
  const dim3 block(kColThreadsX, kColThreadsY);
  FASTGPT_DISPATCH_DTYPE(out_dtype, G, FASTGPT_LAUNCH(grid, block, 0, stream, column_sums_kernel<G>)(
                                          partial0, partial1, partial_rows, cols, static_cast<G*>(out0), static_cast<G*>(out1)));
  return cudaGetLastError();
}

}  // namespace fastgpt

using namespace fastgpt;

FASTGPT_API int fastgpt_layer_norm_fwd(const FgLayerNormFwdArgs* args, cudaStream_t stream) {
  const FgLayerNormFwdArgs& a = *args;
  if (!shape_ok(a.rows, a.cols) || !valid_dtype(a.dtype) || a.x == nullptr || a.y == nullptr || a.mean == nullptr ||
      a.rstd == nullptr || (a.residual != nullptr && a.sum == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (a.rows == 0) return cudaSuccess;
  const int64_t pd = (a.weight != nullptr || a.bias != nullptr) ? a.param_dtype : a.dtype;
  FASTGPT_DISPATCH_X_PARAM(a.dtype, pd, layer_norm_fwd_typed, a, stream);
}

FASTGPT_API size_t fastgpt_layer_norm_bwd_workspace_size(const FgLayerNormBwdArgs* args) {
  const FgLayerNormBwdArgs& a = *args;
  if (!shape_ok(a.rows, a.cols) || a.rows == 0) return 0;
  const int64_t pd = a.weight != nullptr ? a.param_dtype : a.dtype;
  if (!valid_param_dtype(a.dtype, pd)) return 0;
  switch (a.dtype) {
    case FG_FLOAT32: return bwd_workspace_typed<float, float>(a);
    case FG_FLOAT16: return pd == FG_FLOAT32 ? bwd_workspace_typed<__half, float>(a) : bwd_workspace_typed<__half, __half>(a);
    case FG_BFLOAT16:
      return pd == FG_FLOAT32 ? bwd_workspace_typed<__nv_bfloat16, float>(a) : bwd_workspace_typed<__nv_bfloat16, __nv_bfloat16>(a);
    default: return 0;
  }
}

FASTGPT_API int fastgpt_layer_norm_bwd(const FgLayerNormBwdArgs* args, cudaStream_t stream) {
  const FgLayerNormBwdArgs& a = *args;
  const bool want_params = a.dweight != nullptr || a.dbias != nullptr;
  if (!shape_ok(a.rows, a.cols) || !valid_dtype(a.dtype) || a.dy == nullptr || a.x == nullptr || a.dx == nullptr ||
      a.mean == nullptr || a.rstd == nullptr || (want_params && (!valid_dtype(a.grad_dtype) || a.workspace == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (a.rows == 0) return cudaSuccess;  // the caller zero-fills dweight/dbias of an empty batch
  const int64_t pd = a.weight != nullptr ? a.param_dtype : a.dtype;
  FASTGPT_DISPATCH_X_PARAM(a.dtype, pd, layer_norm_bwd_typed, a, stream);
}
