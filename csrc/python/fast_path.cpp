// The two checks of idefics3_kit/ops/fast_path.py (plain_tensors, plain_modules) and the state
// snapshot its cached plans compare (module_state) in C, for the calls that run them over hundreds
// of objects: a decode step asks them about every weight, scale, cache buffer and module of the
// decoder (~420 tensors and ~360 modules at SmolVLM-256M shapes), which took ~0.3 ms of Python per
// step, a tenth of an int4 step on a fast host. The Python functions stay the reference and the
// fallback; tests/ops/test_fast_path_compiled.py checks that both give the same answer for every
// kind of object.
//
// Only exact instances of the types the caller names (torch.Tensor, nn.Parameter) are unpacked:
// those are THPVariable objects, so reading their at::Tensor is a field access. Everything else
// (subclasses, None aside) makes the check fail before any unpacking.
#include <Python.h>

#include <string>
#include <vector>

#include <torch/csrc/autograd/python_variable.h>

namespace idefics3_kit {

// csrc/python/decode_call.cpp
PyObject* decode_layers_call(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* decode_silu_matches_aten(PyObject*, PyObject*);

namespace {

// ---- prefetching -----------------------------------------------------------------------------
// A decode step streams every weight through the caches, so each step finds the ~360 modules and
// ~480 tensors these checks read evicted to memory. The walks chase pointers (module -> instance
// dict -> its table -> _parameters dict -> ...), one miss at a time. So before walking, the
// objects of each level are prefetched for all modules (or tensors) at once, level by level,
// which lets the misses of a level overlap. Prefetches never change an answer: a wrong guess only
// costs a cache line. Measured with the caches flushed before each call (SmolVLM-256M int4
// decoder, medians of 30; benchmarks cannot see this, the step's noise is larger):
// module_state 199 -> 162-170 us, plain_modules 150 -> 93-97, plain_tensors over the 210
// quantized weights 36 -> 26-28, all of ops.decode_layers' checks 276 -> 205. The rest is not
// data: the interpreter's and these functions' own code is evicted too (a bare Python loop over
// the 361 modules costs ~55 us cold).

inline void prefetch_lines(const void* p, int lines) {
  for (int i = 0; i < lines; ++i) __builtin_prefetch(static_cast<const char*>(p) + 64 * i);
}

// The instance __dict__ of obj without a new reference, or null when it has none. (Python 3.13
// made the dict pointer private: there the walk just runs without this prefetching.)
PyObject* instance_dict_or_null(PyObject* obj) {
#if PY_VERSION_HEX < 0x030D0000
  PyObject** slot = _PyObject_GetDictPtr(obj);
  return slot != nullptr ? *slot : nullptr;
#else
  (void)obj;
  return nullptr;
#endif
}

constexpr int kInstanceDictLines = 8;   // an nn.Module's ~25 attributes: the start of its table
constexpr int kSmallDictLines = 3;     // _parameters, _modules, a hook dict

// Prefetch a dict object, then (once it is in) the table its lookups read.
void prefetch_dict_table(PyObject* dict, int lines) {
  if (dict == nullptr || !PyDict_Check(dict)) return;
  const auto* d = reinterpret_cast<const PyDictObject*>(dict);
  prefetch_lines(d->ma_keys, lines);
  if (d->ma_values != nullptr) prefetch_lines(d->ma_values, 2);
}

// Every module's object, then its instance dict, then that dict's table, each level for all the
// modules before the next.
void prefetch_modules(PyObject* const* items, Py_ssize_t n) {
  for (Py_ssize_t i = 0; i < n; ++i) prefetch_lines(reinterpret_cast<const char*>(items[i]) - 64, 2);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (PyObject* dict = instance_dict_or_null(items[i])) __builtin_prefetch(dict);
  }
  for (Py_ssize_t i = 0; i < n; ++i) prefetch_dict_table(instance_dict_or_null(items[i]), kInstanceDictLines);
}

// The dicts named `names` in every module's instance dict: the objects, then their tables.
void prefetch_member_dicts(PyObject* const* items, Py_ssize_t n, PyObject* const* names, int count) {
  for (int pass = 0; pass < 2; ++pass)
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* dict = instance_dict_or_null(items[i]);
      if (dict == nullptr || !PyDict_Check(dict)) continue;
      for (int k = 0; k < count; ++k) {
        PyObject* member = PyDict_GetItem(dict, names[k]);  // borrowed; no error for a str key
        if (member == nullptr) continue;
        if (pass == 0)
          __builtin_prefetch(member);
        else
          prefetch_dict_table(member, kSmallDictLines);
      }
    }
}

bool exact_type_in(PyObject* obj, PyObject* types /* tuple */) {
  const Py_ssize_t n = PyTuple_GET_SIZE(types);
  for (Py_ssize_t i = 0; i < n; ++i)
    if (reinterpret_cast<PyObject*>(Py_TYPE(obj)) == PyTuple_GET_ITEM(types, i)) return true;
  return false;
}

// plain_tensors(tensors, plain_types, grad_enabled, like, contiguous) -> str | None
//   tensors: a sequence of tensors and Nones (Nones are skipped);
//   plain_types: tuple of the exact types that count as plain;
//   grad_enabled: when true, a tensor that requires grad fails the check;
//   like: None, or a plain tensor whose dtype every tensor must have;
//   contiguous: when true, every tensor must be contiguous.
// Returns the device type shared by the tensors ("cpu" when there are none), None when one fails.
PyObject* plain_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 5) {
    PyErr_Format(PyExc_TypeError, "plain_tensors takes 5 arguments (tensors, plain_types, grad_enabled, like, "
                 "contiguous), got %zd", nargs);
    return nullptr;
  }
  PyObject* types = args[1];
  if (!PyTuple_Check(types)) {
    PyErr_SetString(PyExc_TypeError, "plain_tensors: plain_types must be a tuple of types");
    return nullptr;
  }
  const int grad = PyObject_IsTrue(args[2]);
  const int contiguous = PyObject_IsTrue(args[4]);
  if (grad < 0 || contiguous < 0) return nullptr;
  const at::Tensor* like = nullptr;
  if (args[3] != Py_None) {
    if (!exact_type_in(args[3], types)) {
      PyErr_SetString(PyExc_TypeError, "plain_tensors: like must be None or a plain tensor");
      return nullptr;
    }
    like = &THPVariable_Unpack(args[3]);
  }
  PyObject* seq = PySequence_Fast(args[0], "plain_tensors: tensors must be a sequence");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  for (Py_ssize_t i = 0; i < n; ++i) __builtin_prefetch(items[i]);  // (see prefetching above)
  for (Py_ssize_t i = 0; i < n; ++i)
    if (items[i] != Py_None && exact_type_in(items[i], types))
      prefetch_lines(THPVariable_Unpack(items[i]).unsafeGetTensorImpl(), 4);
  const at::Tensor* first = nullptr;
  bool ok = true;
  for (Py_ssize_t i = 0; i < n && ok; ++i) {
    PyObject* obj = items[i];
    if (obj == Py_None) continue;
    if (!exact_type_in(obj, types)) {
      ok = false;
      break;
    }
    const at::Tensor& t = THPVariable_Unpack(obj);
    ok = !(grad && t.requires_grad()) && !(like && t.scalar_type() != like->scalar_type()) &&
         !(contiguous && !t.is_contiguous()) && (first == nullptr || t.device() == first->device());
    if (first == nullptr) first = &t;
  }
  PyObject* result = nullptr;
  if (!ok) {
    result = Py_NewRef(Py_None);
  } else {
    const std::string kind = first ? c10::DeviceTypeName(first->device().type(), /*lower_case=*/true) : "cpu";
    result = PyUnicode_FromStringAndSize(kind.data(), static_cast<Py_ssize_t>(kind.size()));
  }
  Py_DECREF(seq);
  return result;
}

// A module's hook dict (an attribute in its instance __dict__) is non-empty, or missing (a module
// whose nn.Module.__init__ never ran: not one to vouch for). -1 with an error set.
int has_hooks(PyObject* instance_dict, PyObject* name) {
  PyObject* hooks = PyDict_GetItemWithError(instance_dict, name);  // borrowed
  if (hooks == nullptr) return PyErr_Occurred() ? -1 : 1;
  return PyObject_IsTrue(hooks);
}

// plain_modules(modules, plain_classes) -> bool: every module's type is in the set
// plain_classes (exactly, not a subclass) and its _forward_hooks and _forward_pre_hooks are
// present and empty. (The global hooks are the caller's to check.)
PyObject* plain_modules(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyAnySet_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "plain_modules takes (modules, plain_classes: set)");
    return nullptr;
  }
  static PyObject* forward_hooks = PyUnicode_InternFromString("_forward_hooks");
  static PyObject* forward_pre_hooks = PyUnicode_InternFromString("_forward_pre_hooks");
  if (forward_hooks == nullptr || forward_pre_hooks == nullptr) return nullptr;
  PyObject* seq = PySequence_Fast(args[0], "plain_modules: modules must be a sequence");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  prefetch_modules(items, n);  // (see prefetching above)
  PyObject* const hook_names[2] = {forward_hooks, forward_pre_hooks};
  prefetch_member_dicts(items, n, hook_names, 2);
  int ok = 1;
  for (Py_ssize_t i = 0; i < n && ok == 1; ++i) {
    PyObject* m = items[i];
    ok = PySet_Contains(args[1], reinterpret_cast<PyObject*>(Py_TYPE(m)));
    if (ok != 1) break;
    PyObject* dict = PyObject_GenericGetDict(m, nullptr);  // new reference
    if (dict == nullptr) {
      ok = -1;
      break;
    }
    const int fwd = has_hooks(dict, forward_hooks);
    const int pre = fwd == 0 ? has_hooks(dict, forward_pre_hooks) : 0;
    Py_DECREF(dict);
    ok = fwd < 0 || pre < 0 ? -1 : (fwd == 0 && pre == 0);
  }
  Py_DECREF(seq);
  if (ok < 0) return nullptr;
  return PyBool_FromLong(ok);
}

// One module's part of module_state: the module, its class, each of its _parameters and _modules
// dicts as key, value, key, value, ... followed by a separator (None in place of a dict that is
// missing or not a dict), then the instance attributes named in attrs (None when absent).
// Appends borrowed references (the module's dicts own them, and no Python code runs meanwhile).
bool module_state_of(PyObject* m, PyObject* attrs /* tuple of str */, PyObject* separator, std::vector<PyObject*>& out) {
  static PyObject* dict_names[2] = {PyUnicode_InternFromString("_parameters"), PyUnicode_InternFromString("_modules")};
  for (PyObject* name : dict_names)
    if (name == nullptr) return false;
  out.push_back(m);
  out.push_back(reinterpret_cast<PyObject*>(Py_TYPE(m)));
  PyObject* dict = PyObject_GenericGetDict(m, nullptr);  // new reference
  if (dict == nullptr) return false;
  bool ok = true;
  for (PyObject* name : dict_names) {
    PyObject* sub = PyDict_GetItemWithError(dict, name);  // borrowed
    if (sub == nullptr && PyErr_Occurred()) {
      ok = false;
      break;
    }
    if (sub == nullptr || !PyDict_Check(sub)) {
      out.push_back(Py_None);
      continue;
    }
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(sub, &pos, &key, &value)) {
      out.push_back(key);
      out.push_back(value);
    }
    out.push_back(separator);
  }
  const Py_ssize_t n = ok ? PyTuple_GET_SIZE(attrs) : 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* value = PyDict_GetItemWithError(dict, PyTuple_GET_ITEM(attrs, i));  // borrowed
    if (value == nullptr && PyErr_Occurred()) {
      ok = false;
      break;
    }
    out.push_back(value ? value : Py_None);
  }
  Py_DECREF(dict);
  return ok;
}

// module_state(modules, attrs, separator, previous) -> tuple: what a plan cached over these modules
// depends on (module_state_of, module after module); `previous` itself when it holds exactly the
// same objects (identity), so the caller tells "unchanged" by `result is previous`.
PyObject* module_state(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4 || !PyTuple_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "module_state takes (modules, attrs: tuple of str, separator, previous)");
    return nullptr;
  }
  const Py_ssize_t n_attrs = PyTuple_GET_SIZE(args[1]);
  for (Py_ssize_t i = 0; i < n_attrs; ++i)
    if (!PyUnicode_Check(PyTuple_GET_ITEM(args[1], i))) {
      PyErr_SetString(PyExc_TypeError, "module_state: attrs must be a tuple of str");
      return nullptr;
    }
  PyObject* seq = PySequence_Fast(args[0], "module_state: modules must be a sequence");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  prefetch_modules(items, n);  // (see prefetching above)
  static PyObject* member_names[2] = {PyUnicode_InternFromString("_parameters"), PyUnicode_InternFromString("_modules")};
  if (member_names[0] != nullptr && member_names[1] != nullptr) prefetch_member_dicts(items, n, member_names, 2);
  std::vector<PyObject*> found;
  found.reserve(static_cast<size_t>(n) * 12);
  bool ok = true;
  for (Py_ssize_t i = 0; i < n && ok; ++i) ok = module_state_of(items[i], args[1], args[2], found);
  PyObject* result = nullptr;
  if (ok) {
    PyObject* previous = args[3];
    bool same = PyTuple_Check(previous) && PyTuple_GET_SIZE(previous) == static_cast<Py_ssize_t>(found.size());
    for (size_t i = 0; same && i < found.size(); ++i) same = PyTuple_GET_ITEM(previous, i) == found[i];
    if (same) {
      result = Py_NewRef(previous);
    } else if ((result = PyTuple_New(static_cast<Py_ssize_t>(found.size()))) != nullptr) {
      for (size_t i = 0; i < found.size(); ++i) PyTuple_SET_ITEM(result, i, Py_NewRef(found[i]));
    }
  }
  Py_DECREF(seq);
  return result;
}

// ---- module_watch / unchanged_since: module_state's question in a few cache lines per module ----
// module_state walks every entry of every module's dicts at each decode step (~130 us with the
// caches cold, for the ~360 modules of SmolVLM-256M's decoder), and plain_modules walks them again
// for their hooks. CPython 3.11 and 3.12 give every dict a version tag that changes whenever the
// dict changes (PEP 509), so a watch that keeps each module's class, its instance dict and its
// _parameters, _modules, _forward_hooks and _forward_pre_hooks dicts with their tags answers "has
// anything module_state or plain_modules would see changed?" by comparing a few words per module.
// A module's parameters, children, hooks and instance attributes all live in those dicts;
// rebinding one of them rewrites the instance dict; a new class or a new instance dict is compared
// directly. The answer errs one way only: a dict written back with what it held reports a change,
// and the caller then asks module_state. Elsewhere (another Python) module_watch returns None.
#if PY_VERSION_HEX < 0x030D0000
#define IK_DICT_VERSIONS 1
#endif

#ifdef IK_DICT_VERSIONS
constexpr int kWatchedDicts = 5;
struct WatchedModule {
  PyObject* module;  // strong references: none of these can be freed and its address reused
  PyObject* type;
  PyObject* dicts[kWatchedDicts];  // the instance dict, then the four watched_dicts names
  uint64_t tags[kWatchedDicts];
};
struct Watch {
  std::vector<WatchedModule> modules;
  ~Watch() {
    for (WatchedModule& w : modules) {
      Py_XDECREF(w.module);
      Py_XDECREF(w.type);
      for (PyObject* d : w.dicts) Py_XDECREF(d);
    }
  }
};
constexpr const char* kWatchName = "idefics3_kit.module_watch";

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"  // ma_version_tag (deprecated in 3.12)
uint64_t dict_tag(PyObject* dict) { return reinterpret_cast<PyDictObject*>(dict)->ma_version_tag; }
#pragma GCC diagnostic pop

void free_watch(PyObject* capsule) { delete static_cast<Watch*>(PyCapsule_GetPointer(capsule, kWatchName)); }

// The watched dicts of m: its instance dict and the _parameters, _modules, _forward_hooks and
// _forward_pre_hooks dicts in it (exact dicts or OrderedDicts, whose entries live in the dict
// itself); false when one is missing or another kind of mapping (then there is nothing to watch).
bool watched_dicts(PyObject* m, PyObject* out[kWatchedDicts]) {
  static PyObject* names[kWatchedDicts - 1] = {
      PyUnicode_InternFromString("_parameters"), PyUnicode_InternFromString("_modules"),
      PyUnicode_InternFromString("_forward_hooks"), PyUnicode_InternFromString("_forward_pre_hooks")};
  auto plain_dict = [](PyObject* d) {
    return d != nullptr && (PyDict_CheckExact(d) || Py_TYPE(d) == &PyODict_Type);
  };
  out[0] = instance_dict_or_null(m);
  if (!plain_dict(out[0])) return false;
  for (int i = 0; i < kWatchedDicts - 1; ++i) {
    if (names[i] == nullptr) return false;
    out[i + 1] = PyDict_GetItem(out[0], names[i]);  // borrowed
    if (!plain_dict(out[i + 1])) return false;
  }
  return true;
}
#endif

// module_watch(modules) -> capsule | None: the watch of these modules as they are now.
PyObject* module_watch(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 1) {
    PyErr_SetString(PyExc_TypeError, "module_watch takes (modules)");
    return nullptr;
  }
#ifdef IK_DICT_VERSIONS
  PyObject* seq = PySequence_Fast(args[0], "module_watch: modules must be a sequence");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  auto* watch = new Watch();
  watch->modules.reserve(static_cast<size_t>(n));
  bool ok = true;
  for (Py_ssize_t i = 0; i < n && ok; ++i) {
    WatchedModule w{};
    ok = watched_dicts(items[i], w.dicts);
    if (!ok) break;
    w.module = Py_NewRef(items[i]);
    w.type = Py_NewRef(reinterpret_cast<PyObject*>(Py_TYPE(items[i])));
    for (int d = 0; d < kWatchedDicts; ++d) {
      Py_INCREF(w.dicts[d]);
      w.tags[d] = dict_tag(w.dicts[d]);
    }
    watch->modules.push_back(w);
  }
  Py_DECREF(seq);
  if (!ok) {
    delete watch;
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  PyObject* capsule = PyCapsule_New(watch, kWatchName, free_watch);
  if (capsule == nullptr) delete watch;
  return capsule;
#else
  (void)args;
  Py_RETURN_NONE;
#endif
}

// unchanged_since(watch) -> bool: True when every watched module still has its class and instance
// dict and none of its watched dicts changed since the watch was taken; False otherwise (or None).
PyObject* unchanged_since(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 1) {
    PyErr_SetString(PyExc_TypeError, "unchanged_since takes (watch)");
    return nullptr;
  }
  if (args[0] == Py_None) Py_RETURN_FALSE;
#ifdef IK_DICT_VERSIONS
  auto* watch = static_cast<Watch*>(PyCapsule_GetPointer(args[0], kWatchName));
  if (watch == nullptr) return nullptr;  // not a watch: PyCapsule_GetPointer set the error
  for (const WatchedModule& w : watch->modules) {  // (see prefetching above)
    prefetch_lines(reinterpret_cast<const char*>(w.module) - 64, 2);
    for (PyObject* d : w.dicts) __builtin_prefetch(d);
  }
  for (const WatchedModule& w : watch->modules) {
    if (reinterpret_cast<PyObject*>(Py_TYPE(w.module)) != w.type || instance_dict_or_null(w.module) != w.dicts[0])
      Py_RETURN_FALSE;
    for (int d = 0; d < kWatchedDicts; ++d)
      if (dict_tag(w.dicts[d]) != w.tags[d]) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
#else
  PyErr_SetString(PyExc_TypeError, "unchanged_since: this Python makes no watches (module_watch returned None)");
  return nullptr;
#endif
}

PyMethodDef methods[] = {
    {"decode_layers_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(decode_layers_call)),
     METH_FASTCALL, "the decode_layers op called with its lists read directly (see csrc/python/decode_call.cpp)"},
    {"decode_silu_matches_aten", decode_silu_matches_aten, METH_NOARGS,
     "whether decode_layers' fused SiLU * up runs (it matched ATen's bits at its first use)"},
    {"module_watch", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(module_watch)), METH_FASTCALL,
     "a watch of the modules' classes and dicts for unchanged_since (see csrc/python/fast_path.cpp)"},
    {"unchanged_since", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(unchanged_since)), METH_FASTCALL,
     "whether no watched module changed what module_state sees since module_watch"},
    {"plain_tensors", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plain_tensors)), METH_FASTCALL,
     "fast_path.plain_tensors in C (see csrc/python/fast_path.cpp)"},
    {"plain_modules", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plain_modules)), METH_FASTCALL,
     "fast_path.plain_modules in C, without the global-hook check"},
    {"module_state", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(module_state)), METH_FASTCALL,
     "fast_path.module_state in C"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* python_methods() { return methods; }

}  // namespace idefics3_kit
