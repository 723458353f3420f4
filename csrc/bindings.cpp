// Torch bindings of the fastgpt CUDA kernels: the ops fastgpt_cuda::* (what fastgpt.cuda_ext.load()
// returns). The only translation unit that includes torch headers, and only light ones (no
// torch/extension.h, no pybind11): the library is loaded with torch.ops.load_library.
//
// Each op validates its inputs first (float32/float16/bfloat16, shapes, contiguity, then CUDA
// tensors on one device) and raises ValueError/TypeError naming the argument (incoming gradients
// are made contiguous instead), then allocates its outputs and calls the
// kernels' C entry points (fastgpt_cuda.h) on the current stream of x's device. The ops are
// registered for every backend (CompositeExplicitAutograd), so that a CPU tensor reaches the
// validation and gets a clear error rather than a dispatcher message; they have no autograd of
// their own (fastgpt's custom ops in fastgpt/ops wrap them).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "fastgpt_cuda.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

int64_t fg_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FG_FLOAT32;
    case at::kHalf: return FG_FLOAT16;
    case at::kBFloat16: return FG_BFLOAT16;
    default: return -1;
  }
}

const void* ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// Structural checks first (dtype, shape, contiguity), devices last: the errors say what is wrong
// with a tensor even on a machine without a GPU, where every tensor is a CPU tensor.

// A float32/float16/bfloat16 tensor, contiguous.
void check_input(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_TYPE(fg_dtype(t.scalar_type()) >= 0, op, ": ", name, " must be float32, float16 or bfloat16; got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// t has x's shape and dtype.
void check_like(const char* op, const char* name, const Tensor& t, const char* x_name, const Tensor& x) {
  check_input(op, name, t);
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, " must have ", x_name, "'s shape ", x.sizes(), "; got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ", x_name,
                   " has ", x.scalar_type());
}

// A per-column parameter: (n,), x's dtype or float32 for 16-bit x.
void check_param(const char* op, const char* name, const OptTensor& p, const Tensor& x, int64_t n) {
  if (!p.has_value()) return;
  check_input(op, name, *p);
  TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == n, op, ": ", name, " must have shape (", n, ",); got ", p->sizes());
  const bool ok = p->scalar_type() == x.scalar_type() || (x.scalar_type() != at::kFloat && p->scalar_type() == at::kFloat);
  TORCH_CHECK_TYPE(ok, op, ": ", name, " has dtype ", p->scalar_type(), "; expected ", x.scalar_type(),
                   x.scalar_type() != at::kFloat ? " or float32" : "", " (x has ", x.scalar_type(), ")");
}

void check_stats(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32; got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(0) && t.is_contiguous(), op, ": ", name,
                    " must be a contiguous (", x.size(0), ",) tensor; got ", t.sizes());
}

// x is a CUDA tensor and every other given tensor is on x's device.
void check_devices(const char* op, const char* x_name, const Tensor& x,
                   std::initializer_list<std::pair<const char*, const Tensor*>> others) {
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": ", x_name, " must be a CUDA tensor; got a tensor on ", x.device());
  for (const auto& [name, t] : others) {
    if (t == nullptr || !t->defined()) continue;
    TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but ", x_name, " is on ",
                      x.device());
  }
}

const Tensor* opt(const OptTensor& t) { return t.has_value() ? &*t : nullptr; }

void check_2d(const char* op, const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) >= 1, op, ": x must be 2-D (rows, normalized size >= 1); got shape ", x.sizes());
}

// ("str" arguments bind to c10::string_view: its own class in older torch, std::string_view in newer.)
int64_t approximate_code(const char* op, c10::string_view approximate) {
  if (approximate == "none") return FG_GELU_ERF;
  if (approximate == "tanh") return FG_GELU_TANH;
  TORCH_CHECK_VALUE(false, op, ": approximate must be 'none' or 'tanh'; got '", std::string(approximate.data(), approximate.size()), "'");
  return -1;
}

void check_launch(const char* op, int err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// ---- layer norm --------------------------------------------------------------------------------

// The kernels take one parameter dtype: a bias of another dtype than the weight is converted (n elements).
OptTensor match_bias(const OptTensor& weight, const OptTensor& bias) {
  if (weight.has_value() && bias.has_value() && bias->scalar_type() != weight->scalar_type()) {
    return bias->to(weight->scalar_type());
  }
  return bias;
}

int64_t param_dtype(const Tensor& x, const OptTensor& weight, const OptTensor& bias) {
  if (weight.has_value()) return fg_dtype(weight->scalar_type());
  if (bias.has_value()) return fg_dtype(bias->scalar_type());
  return fg_dtype(x.scalar_type());
}

Tensors4 ln_fwd(const char* op, const Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias_in,
                double eps) {
  check_input(op, "x", x);
  check_2d(op, x);
  if (residual.has_value()) check_like(op, "residual", *residual, "x", x);
  check_param(op, "weight", weight, x, x.size(1));
  check_param(op, "bias", bias_in, x, x.size(1));
  check_devices(op, "x", x, {{"residual", opt(residual)}, {"weight", opt(weight)}, {"bias", opt(bias_in)}});
  const c10::cuda::CUDAGuard guard(x.device());
  const OptTensor bias = match_bias(weight, bias_in);
  Tensor y = at::empty_like(x);
  Tensor s = residual.has_value() ? at::empty_like(x) : Tensor();
  Tensor mean = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  FgLayerNormFwdArgs a{};
  a.rows = x.size(0);
  a.cols = x.size(1);
  a.dtype = fg_dtype(x.scalar_type());
  a.param_dtype = param_dtype(x, weight, bias);
  a.eps = eps;
  a.x = x.data_ptr();
  a.residual = ptr(residual);
  a.weight = ptr(weight);
  a.bias = ptr(bias);
  a.y = y.data_ptr();
  a.sum = s.defined() ? s.data_ptr() : nullptr;
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  if (a.rows > 0) check_launch(op, fastgpt_layer_norm_fwd(&a, stream()));
  return {y, s, mean, rstd};
}

// x_name: "x" for layer norm, "s" (the sum) for add + layer norm. Incoming gradients (dy, dsum) are
// made contiguous (autograd can hand over expanded ones, e.g. the gradient of y.sum()).
Tensors3 ln_bwd(const char* op, const char* x_name, const Tensor& dy_in, const OptTensor& dsum_in, const Tensor& x,
                const OptTensor& weight, const Tensor& mean, const Tensor& rstd, bool need_weight_grad, bool need_bias_grad) {
  const Tensor dy = dy_in.contiguous();
  const OptTensor dsum = dsum_in.has_value() ? OptTensor(dsum_in->contiguous()) : std::nullopt;
  check_input(op, x_name, x);
  check_2d(op, x);
  check_like(op, "dy", dy, x_name, x);
  if (dsum.has_value()) check_like(op, "dsum", *dsum, x_name, x);
  check_param(op, "weight", weight, x, x.size(1));
  check_stats(op, "mean", mean, x);
  check_stats(op, "rstd", rstd, x);
  check_devices(op, x_name, x, {{"dy", &dy}, {"dsum", opt(dsum)}, {"weight", opt(weight)}, {"mean", &mean}, {"rstd", &rstd}});
  const c10::cuda::CUDAGuard guard(x.device());
  const auto gdtype = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  const int64_t n = x.size(1);
  Tensor dx = at::empty_like(x);
  Tensor dw = need_weight_grad ? at::empty({n}, x.options().dtype(gdtype)) : at::empty({0}, x.options());
  Tensor db = need_bias_grad ? at::empty({n}, x.options().dtype(gdtype)) : at::empty({0}, x.options());
  FgLayerNormBwdArgs a{};
  a.rows = x.size(0);
  a.cols = n;
  a.dtype = fg_dtype(x.scalar_type());
  a.param_dtype = weight.has_value() ? fg_dtype(weight->scalar_type()) : a.dtype;
  a.grad_dtype = fg_dtype(gdtype);
  a.dy = dy.data_ptr();
  a.x = x.data_ptr();
  a.weight = ptr(weight);
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.dsum = ptr(dsum);
  a.dx = dx.data_ptr();
  a.dweight = need_weight_grad ? dw.data_ptr() : nullptr;
  a.dbias = need_bias_grad ? db.data_ptr() : nullptr;
  if (a.rows == 0) {  // an empty batch contributes nothing to the parameter gradients
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }
  Tensor workspace = at::empty({static_cast<int64_t>(fastgpt_layer_norm_bwd_workspace_size(&a))}, x.options().dtype(at::kByte));
  a.workspace = workspace.numel() ? workspace.data_ptr() : nullptr;
  check_launch(op, fastgpt_layer_norm_bwd(&a, stream()));
  return {dx, dw, db};
}

Tensors3 layer_norm_fwd(const Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps) {
  Tensors4 out = ln_fwd("fastgpt_cuda::layer_norm_fwd", x, std::nullopt, weight, bias, eps);
  return {std::get<0>(out), std::get<2>(out), std::get<3>(out)};
}

Tensors3 layer_norm_bwd(const Tensor& dy, const Tensor& x, const OptTensor& weight, const Tensor& mean, const Tensor& rstd,
                        bool need_weight_grad, bool need_bias_grad) {
  return ln_bwd("fastgpt_cuda::layer_norm_bwd", "x", dy, std::nullopt, x, weight, mean, rstd, need_weight_grad, need_bias_grad);
}

Tensors4 add_layer_norm_fwd(const Tensor& x, const Tensor& residual, const OptTensor& weight, const OptTensor& bias, double eps) {
  return ln_fwd("fastgpt_cuda::add_layer_norm_fwd", x, residual, weight, bias, eps);
}

Tensors3 add_layer_norm_bwd(const Tensor& dy, const OptTensor& dsum, const Tensor& s, const OptTensor& weight,
                            const Tensor& mean, const Tensor& rstd, bool need_weight_grad, bool need_bias_grad) {
  return ln_bwd("fastgpt_cuda::add_layer_norm_bwd", "s", dy, dsum, s, weight, mean, rstd, need_weight_grad, need_bias_grad);
}

// ---- GELU --------------------------------------------------------------------------------------

FgGeluArgs gelu_args(const char* op, const Tensor& x, c10::string_view approximate, const OptTensor& bias) {
  check_input(op, "x", x);
  FgGeluArgs a{};
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dim; got a 0-dim tensor");
    check_param(op, "bias", bias, x, x.size(-1));
    a.cols = x.size(-1);
    a.rows = a.cols > 0 ? x.numel() / a.cols : 0;
    a.bias_dtype = fg_dtype(bias->scalar_type());
    a.bias = bias->data_ptr();
  } else {
    a.rows = x.numel() > 0 ? 1 : 0;
    a.cols = x.numel() > 0 ? x.numel() : 1;
    a.bias_dtype = fg_dtype(x.scalar_type());
  }
  a.dtype = fg_dtype(x.scalar_type());
  a.approximate = approximate_code(op, approximate);
  a.x = x.data_ptr();
  return a;
}

Tensor gelu_fwd(const Tensor& x, c10::string_view approximate) {
  const char* op = "fastgpt_cuda::gelu_fwd";
  FgGeluArgs a = gelu_args(op, x, approximate, std::nullopt);
  check_devices(op, "x", x, {});
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty_like(x);
  a.out = y.data_ptr();
  if (a.rows > 0) check_launch(op, fastgpt_gelu_fwd(&a, stream()));
  return y;
}

Tensor gelu_bwd(const Tensor& dy_in, const Tensor& x, c10::string_view approximate) {
  const char* op = "fastgpt_cuda::gelu_bwd";
  const Tensor dy = dy_in.contiguous();
  FgGeluArgs a = gelu_args(op, x, approximate, std::nullopt);
  check_like(op, "dy", dy, "x", x);
  check_devices(op, "x", x, {{"dy", &dy}});
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor dx = at::empty_like(x);
  a.dy = dy.data_ptr();
  a.out = dx.data_ptr();
  if (a.rows > 0) check_launch(op, fastgpt_gelu_bwd(&a, stream()));
  return dx;
}

Tensor bias_gelu_fwd(const Tensor& x, const Tensor& bias, c10::string_view approximate) {
  const char* op = "fastgpt_cuda::bias_gelu_fwd";
  FgGeluArgs a = gelu_args(op, x, approximate, bias);
  check_devices(op, "x", x, {{"bias", &bias}});
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty_like(x);
  a.out = y.data_ptr();
  if (a.rows > 0) check_launch(op, fastgpt_bias_gelu_fwd(&a, stream()));
  return y;
}

std::tuple<Tensor, Tensor> bias_gelu_bwd(const Tensor& dy_in, const Tensor& x, const Tensor& bias, c10::string_view approximate) {
  const char* op = "fastgpt_cuda::bias_gelu_bwd";
  const Tensor dy = dy_in.contiguous();
  FgGeluArgs a = gelu_args(op, x, approximate, bias);
  check_like(op, "dy", dy, "x", x);
  check_devices(op, "x", x, {{"dy", &dy}, {"bias", &bias}});
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor dx = at::empty_like(x);
  Tensor dbias = at::empty_like(bias);
  a.dy = dy.data_ptr();
  a.out = dx.data_ptr();
  a.dbias = dbias.data_ptr();
  if (a.rows == 0) {
    dbias.zero_();
    return {dx, dbias};
  }
  Tensor workspace = at::empty({static_cast<int64_t>(fastgpt_bias_gelu_bwd_workspace_size(&a))}, x.options().dtype(at::kByte));
  a.workspace = workspace.data_ptr();
  check_launch(op, fastgpt_bias_gelu_bwd(&a, stream()));
  return {dx, dbias};
}

}  // namespace

TORCH_LIBRARY(fastgpt_cuda, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool need_weight_grad, "
        "bool need_bias_grad) -> (Tensor, Tensor, Tensor)");
  m.def("add_layer_norm_fwd(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("add_layer_norm_bwd(Tensor dy, Tensor? dsum, Tensor s, Tensor? weight, Tensor mean, Tensor rstd, "
        "bool need_weight_grad, bool need_bias_grad) -> (Tensor, Tensor, Tensor)");
  m.def("gelu_fwd(Tensor x, str approximate) -> Tensor");
  m.def("gelu_bwd(Tensor dy, Tensor x, str approximate) -> Tensor");
  m.def("bias_gelu_fwd(Tensor x, Tensor bias, str approximate) -> Tensor");
  m.def("bias_gelu_bwd(Tensor dy, Tensor x, Tensor bias, str approximate) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastgpt_cuda, CompositeExplicitAutograd, m) {
  m.impl("layer_norm_fwd", TORCH_FN(layer_norm_fwd));
  m.impl("layer_norm_bwd", TORCH_FN(layer_norm_bwd));
  m.impl("add_layer_norm_fwd", TORCH_FN(add_layer_norm_fwd));
  m.impl("add_layer_norm_bwd", TORCH_FN(add_layer_norm_bwd));
  m.impl("gelu_fwd", TORCH_FN(gelu_fwd));
  m.impl("gelu_bwd", TORCH_FN(gelu_bwd));
  m.impl("bias_gelu_fwd", TORCH_FN(bias_gelu_fwd));
  m.impl("bias_gelu_bwd", TORCH_FN(bias_gelu_bwd));
}
