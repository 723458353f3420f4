// The C interface of the fastgpt CUDA kernels (layer_norm.cu, gelu.cu).
//
// Callers: the torch bindings (bindings.cpp), and the CPU emulator of the test suite
// (tests/cuda_emu), which compiles the same .cu files with g++ and calls these functions through
// ctypes. Arguments are plain structs of sizes and raw pointers, so the kernel translation units
// need no torch header. Every struct field is 8 bytes wide: the layout is the same for nvcc, g++
// and ctypes.
//
// Conventions shared by every entry point:
//  * tensors are contiguous and row-major; x is (rows, cols) and the per-column parameters
//    (weight, bias) are (cols,);
//  * dtype fields take FG_FLOAT32 / FG_FLOAT16 / FG_BFLOAT16; outputs have x's dtype; all
//    arithmetic is float32;
//  * a null pointer means "absent" wherever a field is documented as optional;
//  * functions return a cudaError_t (as int): cudaSuccess, cudaErrorInvalidValue for arguments the
//    kernels do not take, or the launch error. Nothing is allocated: the caller allocates the
//    outputs and the workspace whose size the matching *_workspace_size function gives.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifndef FASTGPT_API
#define FASTGPT_API extern "C"
#endif

enum { FG_FLOAT32 = 0, FG_FLOAT16 = 1, FG_BFLOAT16 = 2 };
enum { FG_GELU_ERF = 0, FG_GELU_TANH = 1 };

// y = layer_norm(x [+ residual]) over the last dim; mean and rstd (rows,) float32.
typedef struct FgLayerNormFwdArgs {
  int64_t rows, cols;
  int64_t dtype;        // x, residual, y, sum
  int64_t param_dtype;  // weight and bias (one dtype for both): dtype, or FG_FLOAT32
  double eps;
  const void* x;
  const void* residual;  // optional: then sum = x + residual (rounded to dtype) is normalized
  const void* weight;    // optional
  const void* bias;      // optional
  void* y;
  void* sum;  // written iff residual is given
  float* mean;
  float* rstd;
} FgLayerNormFwdArgs;

// dx = layer_norm_backward(dy) [+ dsum]; dweight = sum_rows(dy * xhat), dbias = sum_rows(dy).
typedef struct FgLayerNormBwdArgs {
  int64_t rows, cols;
  int64_t dtype;        // dy, x, dsum, dx
  int64_t param_dtype;  // weight
  int64_t grad_dtype;   // dweight and dbias
  const void* dy;
  const void* x;  // the normalized input (for add + layer norm: the sum)
  const void* weight;  // optional
  const float* mean;
  const float* rstd;
  const void* dsum;  // optional: added to dx (gradient flowing into the sum of add + layer norm)
  void* dx;
  void* dweight;  // optional: not computed when null
  void* dbias;    // optional: not computed when null
  void* workspace;  // fastgpt_layer_norm_bwd_workspace_size(args) bytes, 16-byte aligned
} FgLayerNormBwdArgs;

// GELU and bias + GELU. x is (rows, cols); gelu ignores bias and sees rows * cols elements.
typedef struct FgGeluArgs {
  int64_t rows, cols;
  int64_t dtype;       // x, dy, out
  int64_t bias_dtype;  // bias and dbias: dtype, or FG_FLOAT32
  int64_t approximate; // FG_GELU_ERF or FG_GELU_TANH
  const void* x;
  const void* bias;  // bias_gelu only
  const void* dy;    // backward only
  void* out;         // y (forward) or dx (backward)
  void* dbias;       // bias_gelu backward only
  void* workspace;   // bias_gelu backward: fastgpt_bias_gelu_bwd_workspace_size(args) bytes
} FgGeluArgs;

FASTGPT_API int fastgpt_layer_norm_fwd(const FgLayerNormFwdArgs* args, cudaStream_t stream);
FASTGPT_API size_t fastgpt_layer_norm_bwd_workspace_size(const FgLayerNormBwdArgs* args);
FASTGPT_API int fastgpt_layer_norm_bwd(const FgLayerNormBwdArgs* args, cudaStream_t stream);

FASTGPT_API int fastgpt_gelu_fwd(const FgGeluArgs* args, cudaStream_t stream);
FASTGPT_API int fastgpt_gelu_bwd(const FgGeluArgs* args, cudaStream_t stream);
FASTGPT_API int fastgpt_bias_gelu_fwd(const FgGeluArgs* args, cudaStream_t stream);
FASTGPT_API size_t fastgpt_bias_gelu_bwd_workspace_size(const FgGeluArgs* args);
FASTGPT_API int fastgpt_bias_gelu_bwd(const FgGeluArgs* args, cudaStream_t stream);
