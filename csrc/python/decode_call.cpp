// decode_layers_call: ops.decode_layers' call of the compiled op, with its ~800 list entries
// (360 parameters, 360 scales or None, 60 caches at SmolVLM-256M shapes) read straight from the
// Python lists into the op's argument types, then the same dispatcher call torch.ops makes.
//
// Why: through torch.ops, the boxing of those lists (each entry converted to an IValue, then to
// the op's list types) cost ~120 us of an int4 decode step (~3.5%; the op's own time subtracted
// from the Python call's, measured in the step). Here each entry is a type check and a field
// read (THPVariable_Unpack). The call still goes through the dispatcher (profiler, dispatch
// keys and modes as before), the GIL released, errors translated as torch.ops translates them.
// ops/decode.py calls it only where its checks let the compiled op run; torch.ops stays the
// path everywhere else (torch.compile, the reference ops) and the reference for the tests.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <vector>

namespace idefics3_kit {

bool silu_mul_matches_aten();  // csrc/cpu/silu_mul_aten.cpp

namespace {

using OptList = c10::List<std::optional<at::Tensor>>;

constexpr Py_ssize_t kArgs = 16;  // the op's schema (csrc/ops.cpp), in its order

[[noreturn]] void type_error(const std::string& what) { throw torch::TypeError("decode_layers_call: " + what); }

at::Tensor tensor_arg(PyObject* obj, const char* name) {
  if (!THPVariable_Check(obj)) type_error(std::string(name) + " must be a tensor, got " + Py_TYPE(obj)->tp_name);
  return THPVariable_Unpack(obj);
}

std::optional<at::Tensor> optional_tensor_arg(PyObject* obj, const char* name) {
  if (obj == Py_None) return std::nullopt;
  return tensor_arg(obj, name);
}

// A list or tuple's items (borrowed), or a TypeError naming the argument.
PyObject** sequence_items(PyObject* obj, Py_ssize_t& n, const char* name) {
  if (PyList_Check(obj)) {
    n = PyList_GET_SIZE(obj);
    return reinterpret_cast<PyListObject*>(obj)->ob_item;
  }
  if (PyTuple_Check(obj)) {
    n = PyTuple_GET_SIZE(obj);
    return reinterpret_cast<PyTupleObject*>(obj)->ob_item;
  }
  type_error(std::string(name) + " must be a list or tuple, got " + Py_TYPE(obj)->tp_name);
}

OptList optional_tensor_list(PyObject* obj, const char* name) {
  Py_ssize_t n = 0;
  PyObject** items = sequence_items(obj, n, name);
  OptList out;
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) out.push_back(optional_tensor_arg(items[i], name));
  return out;
}

std::vector<at::Tensor> tensor_list(PyObject* obj, const char* name) {
  Py_ssize_t n = 0;
  PyObject** items = sequence_items(obj, n, name);
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) out.push_back(tensor_arg(items[i], name));
  return out;
}

int64_t int_arg(PyObject* obj, const char* name) {
  if (!PyLong_Check(obj)) type_error(std::string(name) + " must be an int, got " + Py_TYPE(obj)->tp_name);
  const long long value = PyLong_AsLongLong(obj);
  if (value == -1 && PyErr_Occurred()) throw python_error();
  return value;
}

double float_arg(PyObject* obj, const char* name) {
  if (!PyFloat_Check(obj) && !PyLong_Check(obj))
    type_error(std::string(name) + " must be a float, got " + Py_TYPE(obj)->tp_name);
  const double value = PyFloat_AsDouble(obj);
  if (value == -1.0 && PyErr_Occurred()) throw python_error();
  return value;
}

}  // namespace

// decode_layers_call(x, params, k_cache, v_cache, cos, sin_signed, key_mask, past, num_heads,
// num_kv_heads, eps, scales, final_norm, head, head_scale, logits): the op's arguments,
// positionally, all of them.
PyObject* decode_layers_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != kArgs)
    type_error("takes the op's " + std::to_string(kArgs) + " arguments, got " + std::to_string(nargs));
  const at::Tensor x = tensor_arg(args[0], "x");
  const OptList params = optional_tensor_list(args[1], "params");
  const std::vector<at::Tensor> k_cache = tensor_list(args[2], "k_cache"), v_cache = tensor_list(args[3], "v_cache");
  const at::Tensor cos = tensor_arg(args[4], "cos"), sin_signed = tensor_arg(args[5], "sin_signed");
  const std::optional<at::Tensor> key_mask = optional_tensor_arg(args[6], "key_mask");
  const int64_t past = int_arg(args[7], "past"), heads = int_arg(args[8], "num_heads");
  const int64_t kv_heads = int_arg(args[9], "num_kv_heads");
  const double eps = float_arg(args[10], "eps");
  const OptList scales = optional_tensor_list(args[11], "scales");
  const std::optional<at::Tensor> final_norm = optional_tensor_arg(args[12], "final_norm");
  const std::optional<at::Tensor> head = optional_tensor_arg(args[13], "head");
  const std::optional<at::Tensor> head_scale = optional_tensor_arg(args[14], "head_scale");
  const std::optional<at::Tensor> logits = optional_tensor_arg(args[15], "logits");
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("idefics3_kit::decode_layers", "")
          .typed<at::Tensor(const at::Tensor&, const OptList&, at::TensorList, at::TensorList, const at::Tensor&,
                            const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, double,
                            const OptList&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(x, params, k_cache, v_cache, cos, sin_signed, key_mask, past, heads, kv_heads, eps, scales,
                  final_norm, head, head_scale, logits);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// Whether decode_layers runs its fused SiLU-and-multiply (csrc/cpu/silu_mul_aten.cpp: on when it
// matched ATen bit for bit over every bf16 value at its first use), for the tests that check it is
// on where ATen runs its AVX-512 kernels.
PyObject* decode_silu_matches_aten(PyObject*, PyObject*) {
  if (silu_mul_matches_aten()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

}  // namespace idefics3_kit
