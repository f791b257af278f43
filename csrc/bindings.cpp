// unlearn_fast._C: argument checks, CPU/CUDA dispatch and the Python module.
//
// Every check lives here, so the CPU and CUDA implementations share one contract and one set of error
// messages: shapes and values -> ValueError, dtypes -> TypeError.
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "unlearn_fast_ops.h"

// Argument errors are set on the interpreter (PyErr_SetString) and leave as pybind11::error_already_set, which
// the dispatcher compiled into this module catches first and restores: no exception translator runs. Any other
// C++ exception (pybind11::value_error included) goes through the translators in the pybind11 internals this
// module shares with torch._C: all of them (pybind11's default one too) are torch's copies, compiled into
// libtorch_python.so, which rethrow our exception object there. That is the one step of the error path where
// code of another compiler handles it; on the GPU image (torch 2.11, the extension built by its own gcc)
// the first argument error crashed the process, with c10::ValueError (H100 run 1) and with
// pybind11::value_error (runs 2, 3), not reproducible elsewhere: see benchmarks/RESULTS.md.
#define UF_CHECK_VALUE(cond, ...) \
  do {                            \
    if (!(cond)) ::unlearn_fast::raise_python(PyExc_ValueError, c10::str(__VA_ARGS__)); \
  } while (0)
#define UF_CHECK_TYPE(cond, ...) \
  do {                           \
    if (!(cond)) ::unlearn_fast::raise_python(PyExc_TypeError, c10::str(__VA_ARGS__)); \
  } while (0)

namespace unlearn_fast {

// Sets the Python exception and unwinds to the dispatcher (the GIL is held: the bound functions never drop it).
[[noreturn]] void raise_python(PyObject* type, const std::string& message) {
  PyErr_SetString(type, message.c_str());
  throw pybind11::error_already_set();
}

namespace {

// The implementations' own c10 value/type errors (CPU row-index check, launch limits), raised the same way.
template <typename F>
auto raise_as_python(F&& run) -> decltype(run()) {
  try {
    return run();
  } catch (const c10::ValueError& e) {
    raise_python(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    raise_python(PyExc_TypeError, e.what_without_backtrace());
  }
}

#ifdef UNLEARN_FAST_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

bool is_half_single(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_device_supported(const char* op, const at::Tensor& t) {
  UF_CHECK_VALUE(t.device().is_cpu() || t.device().is_cuda(), op, ": tensors must be on the CPU or a CUDA "
                 "device, got ", t.device());
  UF_CHECK_VALUE(!t.device().is_cuda() || kWithCuda, op, ": got a CUDA tensor but unlearn_fast._C was built "
                 "without CUDA kernels; rebuild with UNLEARN_FAST_CUDA=1 pip install --no-build-isolation -e .");
}

// The kernels read one plain strided buffer: sparse, sparse-compressed, MKL-DNN and nested tensors have none
// (their sizes() / contiguous() throw from deep inside torch, or a nested one reads as one flat buffer).
// Checked first for every tensor argument, before its sizes are read.
void check_dense(const char* op, const std::string& name, const at::Tensor& t) {
  UF_CHECK_TYPE(!t.is_nested(), op, ": ", name, " must be a dense (strided) tensor, got a nested tensor");
  UF_CHECK_TYPE(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got a ", t.layout(),
                " tensor");
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& latent) {
  UF_CHECK_VALUE(t.device() == latent.device(), op, ": ", name, " is on ", t.device(), " but latent is on ",
                 latent.device());
}

// A target table [rows, T, D]; None or any tensor with no elements means "no rows".
at::Tensor checked_table(const char* name, const std::optional<at::Tensor>& table, const at::Tensor& latent) {
  constexpr const char* op = "retain_forget_l2_forward";
  if (!table.has_value() || !table->defined()) {
    return at::Tensor();
  }
  const at::Tensor& t = *table;
  check_dense(op, name, t);
  if (t.numel() == 0) {
    return at::Tensor();
  }
  UF_CHECK_VALUE(t.dim() == 3 && t.size(1) == latent.size(1) && t.size(2) == latent.size(2), op, ": ", name,
                 " must be [rows, T, D] with T, D = ", latent.size(1), ", ", latent.size(2), " (the latent's), "
                 "got ", t.sizes());
  UF_CHECK_TYPE(is_half_single(t.scalar_type()), op, ": ", name, " dtype must be float32, float16 or bfloat16, "
                "got ", t.scalar_type());
  check_same_device(op, name, t, latent);
  return t.detach().contiguous();
}

at::Tensor checked_norm_param(const char* name, const at::Tensor& p, const at::Tensor& latent) {
  constexpr const char* op = "retain_forget_l2_forward";
  const int64_t d = latent.size(2);
  check_dense(op, name, p);
  UF_CHECK_VALUE(p.dim() == 1 && p.size(0) == d, op, ": ", name, " must be [D] with D = ", d, ", got ",
                 p.sizes());
  UF_CHECK_TYPE(at::isFloatingType(p.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
                p.scalar_type());
  check_same_device(op, name, p, latent);
  return p.detach().to(at::kFloat).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> retain_forget_l2_forward(
    const at::Tensor& latent, const std::optional<at::Tensor>& retain_table,
    const std::optional<at::Tensor>& forget_table, const at::Tensor& row_is_forget, const at::Tensor& row_index,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias, double eps,
    double grad_scale, bool compute_grad) {
  constexpr const char* op = "retain_forget_l2_forward";
  check_dense(op, "latent", latent);
  UF_CHECK_VALUE(latent.dim() == 3, op, ": latent must be [N, T, D], got ", latent.sizes());
  UF_CHECK_TYPE(is_half_single(latent.scalar_type()), op, ": latent dtype must be float32, float16 or "
                "bfloat16, got ", latent.scalar_type());
  check_device_supported(op, latent);
  const int64_t n = latent.size(0);

  check_dense(op, "row_is_forget", row_is_forget);
  UF_CHECK_VALUE(row_is_forget.dim() == 1 && row_is_forget.size(0) == n, op, ": row_is_forget must be [N] "
                 "with N = ", n, ", got ", row_is_forget.sizes());
  UF_CHECK_TYPE(row_is_forget.scalar_type() == at::kBool, op, ": row_is_forget must be bool, got ",
                row_is_forget.scalar_type());
  check_same_device(op, "row_is_forget", row_is_forget, latent);
  check_dense(op, "row_index", row_index);
  UF_CHECK_VALUE(row_index.dim() == 1 && row_index.size(0) == n, op, ": row_index must be [N] with N = ", n,
                 ", got ", row_index.sizes());
  UF_CHECK_TYPE(row_index.scalar_type() == at::kLong || row_index.scalar_type() == at::kInt, op,
                ": row_index must be int64 (or int32), got ", row_index.scalar_type());
  check_same_device(op, "row_index", row_index, latent);

  const bool has_weight = norm_weight.has_value() && norm_weight->defined();
  const bool has_bias = norm_bias.has_value() && norm_bias->defined();
  UF_CHECK_VALUE(has_weight || !has_bias, op, ": norm_bias given without norm_weight (the LayerNorm on the "
                 "targets is on exactly when norm_weight is given)");
  UF_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
  UF_CHECK_VALUE(std::isfinite(grad_scale), op, ": grad_scale must be finite, got ", grad_scale);

  RetainForgetL2Args args;
  args.latent = latent.detach().contiguous();
  args.row_is_forget = row_is_forget.contiguous();
  args.row_index = row_index.to(at::kLong).contiguous();
  args.eps = eps;
  args.grad_scale = grad_scale;
  args.compute_grad = compute_grad;
  if (has_weight) {
    args.norm_weight = checked_norm_param("norm_weight", *norm_weight, latent);
    args.norm_bias = has_bias ? checked_norm_param("norm_bias", *norm_bias, latent)
                              : at::zeros_like(args.norm_weight);
  }

  // One table dtype for the kernels: an absent table takes the other's; two present tables of
  // different dtypes are both read as fp32 (a copy).
  at::Tensor retain = checked_table("retain_table", retain_table, latent);
  at::Tensor forget = checked_table("forget_table", forget_table, latent);
  if (retain.defined() && forget.defined() && retain.scalar_type() != forget.scalar_type()) {
    retain = retain.to(at::kFloat);
    forget = forget.to(at::kFloat);
  }
  const at::TensorOptions table_options =
      retain.defined() ? retain.options() : (forget.defined() ? forget.options() : latent.options());
  const std::vector<int64_t> no_rows{0, latent.size(1), latent.size(2)};
  args.retain_table = retain.defined() ? retain : at::empty(no_rows, table_options);
  args.forget_table = forget.defined() ? forget : at::empty(no_rows, table_options);

#ifdef UNLEARN_FAST_WITH_CUDA
  if (latent.device().is_cuda()) {
    return raise_as_python([&] { return retain_forget_l2_forward_cuda(args); });
  }
#endif
  return raise_as_python([&] { return retain_forget_l2_forward_cpu(args); });
}

std::tuple<at::Tensor, at::Tensor> batch_mean_std(const at::Tensor& x) {
  constexpr const char* op = "batch_mean_std";
  UF_CHECK_VALUE(x.defined(), op, ": x is undefined");
  check_dense(op, "x", x);
  UF_CHECK_TYPE(is_half_single(x.scalar_type()) || x.scalar_type() == at::kDouble, op, ": x dtype must be "
                "float32, float64, float16 or bfloat16, got ", x.scalar_type());
  check_device_supported(op, x);
  const at::Tensor xc = x.detach().contiguous();
#ifdef UNLEARN_FAST_WITH_CUDA
  if (xc.device().is_cuda()) {
    return raise_as_python([&] { return batch_mean_std_cuda(xc); });
  }
#endif
  return raise_as_python([&] { return batch_mean_std_cpu(xc); });
}

std::tuple<at::Tensor, std::vector<at::Tensor>> multi_map_l2_forward(const std::vector<at::Tensor>& students,
                                                                     const std::vector<at::Tensor>& teachers,
                                                                     double grad_scale, bool compute_grad) {
  constexpr const char* op = "multi_map_l2_forward";
  UF_CHECK_VALUE(!students.empty() && students.size() == teachers.size(), op, ": need the same non-zero number "
                 "of student and teacher maps, got ", students.size(), " and ", teachers.size());
  UF_CHECK_VALUE(std::isfinite(grad_scale), op, ": grad_scale must be finite, got ", grad_scale);
  for (size_t k = 0; k < students.size(); ++k) {  // before any map's sizes are read
    UF_CHECK_VALUE(students[k].defined() && teachers[k].defined(), op, ": map ", k, " is undefined");
    check_dense(op, c10::str("map ", k, ": the student"), students[k]);
    check_dense(op, c10::str("map ", k, ": the teacher"), teachers[k]);
  }
  const at::Tensor& first = students[0];
  UF_CHECK_VALUE(first.dim() >= 1, op, ": map 0 must be a tensor [N, ...]");
  check_device_supported(op, first);
  MultiMapL2Args args;
  args.n = first.size(0);
  args.grad_scale = grad_scale;
  args.compute_grad = compute_grad;
  for (size_t k = 0; k < students.size(); ++k) {
    const at::Tensor& s = students[k];
    const at::Tensor& t = teachers[k];
    UF_CHECK_VALUE(s.sizes() == t.sizes() && s.dim() >= 1, op, ": map ", k, ": student ", s.sizes(),
                   " and teacher ", t.sizes(), " must have the same shape [N, ...]");
    UF_CHECK_VALUE(s.size(0) == args.n, op, ": map ", k, " has N = ", s.size(0), ", map 0 has N = ", args.n);
    UF_CHECK_VALUE(s.numel() > 0, op, ": map ", k, " has no elements: ", s.sizes());
    UF_CHECK_TYPE(s.scalar_type() == first.scalar_type() && t.scalar_type() == teachers[0].scalar_type(), op,
                  ": map ", k, ": all student maps must share one dtype, and all teacher maps one dtype; got ",
                  s.scalar_type(), "/", t.scalar_type(), " vs map 0's ", first.scalar_type(), "/",
                  teachers[0].scalar_type());
    UF_CHECK_TYPE(is_half_single(s.scalar_type()) && is_half_single(t.scalar_type()), op, ": map ", k,
                  ": dtypes must be float32, float16 or bfloat16, got ", s.scalar_type(), " and ", t.scalar_type());
    UF_CHECK_VALUE(s.device() == first.device() && t.device() == first.device(), op, ": map ", k,
                   ": all maps must be on ", first.device(), ", got ", s.device(), " and ", t.device());
    args.students.push_back(s.detach().contiguous());
    args.teachers.push_back(t.detach().contiguous());
    args.row_elems.push_back(s.numel() / args.n);
  }
#ifdef UNLEARN_FAST_WITH_CUDA
  if (first.device().is_cuda()) {
    return raise_as_python([&] { return multi_map_l2_forward_cuda(args); });
  }
#endif
  return raise_as_python([&] { return multi_map_l2_forward_cpu(args); });
}

}  // namespace unlearn_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "unlearn_fast._C: fused CPU (and, when built with CUDA, GPU) kernels for unlearn_fast.";
  m.def("retain_forget_l2_forward", &unlearn_fast::retain_forget_l2_forward, py::arg("latent"),
        py::arg("retain_table"), py::arg("forget_table"), py::arg("row_is_forget"), py::arg("row_index"),
        py::arg("norm_weight") = py::none(), py::arg("norm_bias") = py::none(), py::arg("eps") = 1e-6,
        py::arg("grad_scale") = 1.0, py::arg("compute_grad") = true,
        R"doc(Per-row squared distance of latent to its target row, and the scaled difference.

latent [N, T, D] (fp32/fp16/bf16); retain_table [R, T, D], forget_table [F, T, D] (None or empty when
absent); row_is_forget [N] bool; row_index [N] int64: row i's target is forget_table[row_index[i]] if
row_is_forget[i] else retain_table[row_index[i]]. With norm_weight [D] (and optional norm_bias [D]) the
target is LayerNorm over D (fp32, biased variance, eps) of that row, times weight plus bias.

Returns (row_sq [N] fp32 = sum over T, D of (x - y)^2, grad [N, T, D] latent dtype = grad_scale * (x - y),
or None when compute_grad is False). A row whose table is empty (absent) has target 0 (norm_bias after the
norm), as in the Triton kernel. An out-of-range row_index into a non-empty table raises on CPU; on CUDA
(which cannot raise without a host sync) it is clamped into the table.)doc");
  m.def("batch_mean_std", &unlearn_fast::batch_mean_std, py::arg("x"),
        "(mean, std) of all elements of x as 0-d fp32 tensors; std is unbiased (NaN for one element). "
        "Chan's parallel combination of per-chunk moments; the CUDA path does not sync the host.");
  m.def("multi_map_l2_forward", &unlearn_fast::multi_map_l2_forward, py::arg("students"), py::arg("teachers"),
        py::arg("grad_scale") = 2.0, py::arg("compute_grad") = true,
        R"doc(Squared distances and student gradients of K feature maps in one call.

students, teachers: lists of K tensors; map k is [N, ...] (the same N for all maps, student and teacher of
the same shape), all students one dtype and all teachers one dtype (fp32/fp16/bf16). Returns
(row_sq [K, N] fp32 with row_sq[k, i] = sum over map k's row i of (s - t)^2, grads = [grad_scale * (s - t)]
in the students' dtype, or [] when compute_grad is False). CPU: fixed-size chunks over all maps and rows,
deterministic. CUDA: one launch for up to 32 maps plus one per-row reduction, no host sync.)doc");
  m.def("has_cuda", [] { return unlearn_fast::kWithCuda; },
        "True when the extension was built with its CUDA kernels (UNLEARN_FAST_WITH_CUDA).");
}
