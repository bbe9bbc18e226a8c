"""The compiled fast-path checks (csrc/python/fast_path.cpp) answer exactly what their Python
references in ops/fast_path.py answer, for every kind of object a caller can hand them: plain
tensors and parameters, subclasses, None, tensors that need grad, other dtypes, views that are not
contiguous, meta tensors, modules of plain and other classes, with and without hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from idefics3_kit import ops
from idefics3_kit.ops import _library, fast_path

needs_ext = pytest.mark.skipif(not ops.has_extension(),
                               reason=f"compiled extension not built ({ops.extension_error()})")


class _SubTensor(torch.Tensor):
    pass


def _tensor(kind: str) -> torch.Tensor | None:
    base = torch.zeros(4, 6)
    return {
        "none": None,
        "plain": base,
        "bf16": base.to(torch.bfloat16),
        "int8": base.to(torch.int8),
        "param": nn.Parameter(base.clone(), requires_grad=False),
        "param_grad": nn.Parameter(base.clone()),
        "needs_grad": base.clone().requires_grad_(),
        "transposed": base.t(),
        "sliced": base[:, ::2],
        "meta": torch.empty(4, 6, device="meta"),
        "subclass": base.as_subclass(_SubTensor),
        "scalar": torch.tensor(1.0),
        "empty": torch.empty(0),
    }[kind]


KINDS = ["none", "plain", "bf16", "int8", "param", "param_grad", "needs_grad", "transposed", "sliced", "meta",
         "subclass", "scalar", "empty"]


def _compiled(name):
    f = _library.compiled_function(name)
    assert f is not None, f"the extension has no {name}"
    return f


@needs_ext
@settings(max_examples=150, deadline=None)
@given(kinds=st.lists(st.sampled_from(KINDS), max_size=6), grad=st.booleans(),
       dtype=st.sampled_from([None, torch.float32, torch.bfloat16]), contiguous=st.booleans())
def test_plain_tensors_compiled_equals_reference(kinds, grad, dtype, contiguous):
    tensors = [_tensor(k) for k in kinds]
    with torch.set_grad_enabled(grad):
        want = fast_path.plain_tensors_reference(tensors, dtype, contiguous)
        like = None if dtype is None else torch.empty(0, dtype=dtype)
        got = _compiled("plain_tensors")(tensors, fast_path.PLAIN_TENSOR_TYPES, grad, like, contiguous)
        assert got == want, (kinds, grad, dtype, contiguous)
        assert fast_path.plain_tensors(tensors, dtype, contiguous) == want  # the wrapper picks the compiled one


@needs_ext
def test_plain_tensors_compiled_takes_any_iterable_and_refuses_bad_arguments():
    check = _compiled("plain_tensors")
    assert check(iter([torch.zeros(1), None]), fast_path.PLAIN_TENSOR_TYPES, False, None, False) == "cpu"
    assert check((), fast_path.PLAIN_TENSOR_TYPES, False, None, False) == "cpu"
    assert check([object()], fast_path.PLAIN_TENSOR_TYPES, False, None, False) is None  # not a tensor: not plain
    with pytest.raises(TypeError, match="plain_types must be a tuple"):
        check([], [torch.Tensor], False, None, False)
    with pytest.raises(TypeError, match="like must be None or a plain tensor"):
        check([], fast_path.PLAIN_TENSOR_TYPES, False, "float32", False)
    with pytest.raises(TypeError, match="must be a sequence"):
        check(3, fast_path.PLAIN_TENSOR_TYPES, False, None, False)
    with pytest.raises(TypeError, match="takes 5 arguments"):
        check([])


class _SubLinear(nn.Linear):
    pass


def _module(kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(2, 2)
    if kind == "embedding":
        return nn.Embedding(3, 2)
    if kind == "subclass":
        return _SubLinear(2, 2)
    if kind == "relu":  # a plain torch module, but not one of the plain classes
        return nn.ReLU()
    m = nn.Linear(2, 2)
    if kind == "forward_hook":
        m.register_forward_hook(lambda *a: None)
    elif kind == "pre_hook":
        m.register_forward_pre_hook(lambda *a: None)
    elif kind == "removed_hook":
        m.register_forward_hook(lambda *a: None).remove()
    return m


MODULE_KINDS = ["linear", "embedding", "subclass", "relu", "forward_hook", "pre_hook", "removed_hook"]


@needs_ext
@settings(max_examples=80, deadline=None)
@given(kinds=st.lists(st.sampled_from(MODULE_KINDS), max_size=5))
def test_plain_modules_compiled_equals_reference(kinds):
    modules = [_module(k) for k in kinds]
    want = fast_path.plain_modules_reference(modules)
    assert _compiled("plain_modules")(modules, fast_path._PLAIN_MODULES) is want, kinds
    assert fast_path.plain_modules(modules) is want


@needs_ext
def test_plain_modules_compiled_edge_cases():
    check = _compiled("plain_modules")
    assert check([], fast_path._PLAIN_MODULES) is True
    assert check([object()], fast_path._PLAIN_MODULES) is False
    bare = nn.Linear.__new__(nn.Linear)  # __init__ never ran: no hook dicts, so not vouched for
    assert check([bare], fast_path._PLAIN_MODULES) is False
    with pytest.raises(TypeError, match="plain_classes: set"):
        check([], list(fast_path._PLAIN_MODULES))


def test_global_hooks_still_turn_the_checks_off():
    m = nn.Linear(2, 2)
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert fast_path.plain_modules([m]) is False
    finally:
        handle.remove()
    assert fast_path.plain_modules([m]) is True


def test_python_references_run_without_the_extension(monkeypatch):
    monkeypatch.setattr(_library, "compiled_function", lambda name: None)
    assert fast_path.plain_tensors([torch.zeros(2), None]) == "cpu"
    assert fast_path.plain_tensors([torch.zeros(2).t()], contiguous=True) == "cpu"
    assert fast_path.plain_tensors([torch.zeros(2, 3).t()], contiguous=True) is None
    assert fast_path.plain_tensors([torch.zeros(2)], dtype=torch.bfloat16) is None
    assert fast_path.plain_modules([nn.Linear(2, 2)]) is True


@needs_ext
def test_compiled_checks_keep_reference_counts():
    """The C functions borrow their arguments: after many calls every object's reference count is
    what it was (a missing or extra decref in csrc/python/fast_path.cpp would show here; None's
    count moves with everything else the interpreter does, so it is not watched)."""
    import sys

    tensors = [torch.zeros(2), None, nn.Parameter(torch.zeros(2), requires_grad=False), torch.zeros(3).t()]
    as_tuple = tuple(tensors)
    modules = [nn.Linear(2, 2), _module("forward_hook"), _SubLinear(2, 2)]
    probe = torch.empty(0)
    watched = [*(t for t in tensors if t is not None), as_tuple, *modules, probe, fast_path.PLAIN_TENSOR_TYPES, fast_path._PLAIN_MODULES]
    watched += [m.__dict__["_forward_hooks"] for m in modules]
    before = [sys.getrefcount(o) for o in watched]
    check_tensors, check_modules = _compiled("plain_tensors"), _compiled("plain_modules")
    for _ in range(1000):
        check_tensors(tensors, fast_path.PLAIN_TENSOR_TYPES, False, probe, True)
        check_tensors(as_tuple, fast_path.PLAIN_TENSOR_TYPES, True, None, False)
        check_tensors(iter(tensors), fast_path.PLAIN_TENSOR_TYPES, False, None, False)
        check_modules(modules, fast_path._PLAIN_MODULES)
        check_modules(modules[:1], fast_path._PLAIN_MODULES)
        with pytest.raises(TypeError):
            check_tensors(tensors, list(fast_path.PLAIN_TENSOR_TYPES), False, None, False)
    assert [sys.getrefcount(o) for o in watched] == before


# ---- module_state: the snapshot cached plans compare ------------------------------------------

def _state_module(kind: str) -> nn.Module:
    if kind == "sequential":
        return nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    if kind == "norm":
        return nn.LayerNorm(3)  # an eps attribute
    if kind == "buffer":
        m = nn.BatchNorm1d(2)  # buffers: not part of the snapshot
        return m
    if kind == "no_bias":
        return nn.Linear(2, 2, bias=False)
    if kind == "attribute":
        m = nn.Linear(2, 2)
        m.act = torch.tanh
        return m
    return _module(kind)


STATE_KINDS = MODULE_KINDS + ["sequential", "norm", "buffer", "no_bias", "attribute"]
ATTRS = ("eps", "act")


def _mutate(m: nn.Module, how: str) -> None:
    if how == "new_parameter" and "weight" in m._parameters:
        m.weight = nn.Parameter(torch.zeros_like(m.weight))
    elif how == "dict_write" and "weight" in m._parameters:
        m._parameters["weight"] = nn.Parameter(torch.zeros_like(m.weight))
    elif how == "new_child":
        m.extra = nn.Linear(1, 1)
    elif how == "attribute":
        m.eps = 0.5
    elif how == "class":
        m.__class__ = type("Dynamic", (type(m),), {})
    elif how == "parameter_to_buffer" and "weight" in m._parameters:
        w = m._parameters.pop("weight")
        m.register_buffer("weight", w.detach())
    elif how == "hook":
        m.register_forward_pre_hook(lambda *a: None)


def _identities(m: nn.Module):
    """(what the snapshot of ``m`` holds, by identity; the objects themselves, kept alive so that
    no id is reused)"""
    objects = [type(m), *m._parameters.items(), *m._modules.items(), m.__dict__.get("eps"), m.__dict__.get("act")]
    flat = [o for pair in objects for o in (pair if isinstance(pair, tuple) else (pair,))]
    return [id(o) for o in flat], flat


MUTATIONS = ["new_parameter", "dict_write", "new_child", "attribute", "class", "parameter_to_buffer", "hook"]


@needs_ext
@settings(max_examples=80, deadline=None)
@given(kinds=st.lists(st.sampled_from(STATE_KINDS), max_size=5), mutate=st.sampled_from(MUTATIONS),
       which=st.integers(0, 4))
def test_module_state_compiled_equals_reference(kinds, mutate, which):
    modules = [_state_module(k) for k in kinds]
    compiled = _compiled("module_state")
    want = fast_path.module_state_reference(modules, ATTRS)
    got = compiled(modules, ATTRS, fast_path._SEPARATOR, None)
    assert len(got) == len(want) and all(a is b for a, b in zip(got, want)), kinds
    # unchanged: the previous snapshot itself, from both
    assert compiled(modules, ATTRS, fast_path._SEPARATOR, got) is got
    assert fast_path.module_state_reference(modules, ATTRS, want) is want
    assert fast_path.module_state(modules, ATTRS, got) is got
    if not modules:
        return
    target = modules[which % len(modules)]
    before = _identities(target)
    _mutate(target, mutate)
    changed = _identities(target)[0] != before[0]
    again = compiled(modules, ATTRS, fast_path._SEPARATOR, got)
    assert (again is not got) == changed, (kinds, mutate)
    reference = fast_path.module_state_reference(modules, ATTRS, want)
    assert (reference is not want) == changed
    assert len(again) == len(reference) and all(a is b for a, b in zip(again, reference))


@needs_ext
def test_module_state_compiled_bad_arguments_and_reference_counts():
    import sys

    compiled = _compiled("module_state")
    with pytest.raises(TypeError, match="attrs: tuple of str"):
        compiled([], ["eps"], fast_path._SEPARATOR, None)
    with pytest.raises(TypeError, match="attrs must be a tuple of str"):
        compiled([], (1,), fast_path._SEPARATOR, None)
    with pytest.raises(TypeError, match="must be a sequence"):
        compiled(3, (), fast_path._SEPARATOR, None)
    for check in (lambda ms: compiled(ms, (), fast_path._SEPARATOR, None), fast_path.module_state_reference):
        with pytest.raises(AttributeError):  # not a module: no instance dict
            check([3])
    modules = [nn.Linear(2, 2), _state_module("sequential"), _state_module("attribute")]
    state = compiled(modules, ATTRS, fast_path._SEPARATOR, None)
    watched = [*modules, state, modules[0].weight, modules[2].act, fast_path._SEPARATOR]
    before = [sys.getrefcount(o) for o in watched]
    for _ in range(1000):
        assert compiled(modules, ATTRS, fast_path._SEPARATOR, state) is state
        fresh = compiled(modules, ATTRS, fast_path._SEPARATOR, None)
        del fresh
    assert [sys.getrefcount(o) for o in watched] == before


def test_module_state_runs_without_the_extension(monkeypatch):
    monkeypatch.setattr(_library, "compiled_function", lambda name: None)
    m = nn.Linear(2, 2)
    state = fast_path.module_state([m], ATTRS)
    assert fast_path.module_state([m], ATTRS, state) is state
    m.weight = nn.Parameter(torch.zeros(2, 2))
    assert fast_path.module_state([m], ATTRS, state) is not state


# ---- module_watch / unchanged_since: module_state's answer from the dicts' version tags -------------

def _watch_or_skip(modules):
    watch = fast_path.module_watch(modules)
    if watch is None:
        pytest.skip("this Python has no dict version tags (module_watch returns None)")
    return watch


@needs_ext
@settings(max_examples=80, deadline=None)
@given(kinds=st.lists(st.sampled_from(STATE_KINDS), min_size=1, max_size=5), mutate=st.sampled_from(MUTATIONS),
       which=st.integers(0, 4))
def test_unchanged_since_never_misses_what_module_state_sees(kinds, mutate, which):
    """Untouched modules: unchanged. After a mutation: whenever module_state's snapshot or
    plain_modules' answer changes, the watch says so too (it may also say so when they did not
    change: the caller then asks them)."""
    modules = [_state_module(k) for k in kinds]
    state = fast_path.module_state(modules, ATTRS)
    plain = fast_path.plain_modules(modules)
    watch = _watch_or_skip(modules)
    assert fast_path.unchanged_since(watch)
    _mutate(modules[which % len(modules)], mutate)
    if fast_path.module_state(modules, ATTRS, state) is not state or fast_path.plain_modules(modules) != plain:
        assert not fast_path.unchanged_since(watch), (kinds, mutate)


@needs_ext
def test_unchanged_since_sees_each_kind_of_change():
    def fresh():
        lin, norm = nn.Linear(2, 2), nn.LayerNorm(3)
        return lin, norm, _watch_or_skip([lin, norm])

    changes = {
        "new weight": lambda lin, norm: setattr(lin, "weight", nn.Parameter(torch.zeros(2, 2))),
        "deleted bias": lambda lin, norm: delattr(lin, "bias"),
        "new child": lambda lin, norm: setattr(norm, "extra", nn.Linear(1, 1)),
        "attribute": lambda lin, norm: setattr(norm, "eps", 0.5),
        "class": lambda lin, norm: setattr(lin, "__class__", type("Dynamic", (nn.Linear,), {})),
        "parameters dict": lambda lin, norm: lin._parameters.__setitem__("weight", nn.Parameter(torch.ones(2, 2))),
        "instance dict": lambda lin, norm: setattr(norm, "__dict__", dict(norm.__dict__)),
        "forward hook": lambda lin, norm: lin.register_forward_hook(lambda *a: None),
        "forward pre-hook": lambda lin, norm: norm.register_forward_pre_hook(lambda *a: None),
    }
    for name, change in changes.items():
        lin, norm, watch = fresh()
        change(lin, norm)
        assert not fast_path.unchanged_since(watch), name
    lin, norm, watch = fresh()
    with torch.no_grad():
        lin.weight.add_(1.0)  # values in place: nothing module_state sees
    assert fast_path.unchanged_since(watch)
    handle = lin.register_forward_hook(lambda *a: None)
    handle.remove()  # the hook dict changed and changed back: reported (errs on the safe side)
    assert not fast_path.unchanged_since(watch)


@needs_ext
def test_module_watch_edges_and_reference_counts():
    import sys

    assert fast_path.unchanged_since(None) is False
    compiled = _compiled("unchanged_since")
    with pytest.raises((TypeError, ValueError)):
        compiled(object())  # not a watch
    with pytest.raises(TypeError, match="must be a sequence"):
        _compiled("module_watch")(3)
    assert fast_path.module_watch([3]) is None  # not a module: nothing to watch
    modules = [nn.Linear(2, 2), _state_module("sequential")]
    before = [sys.getrefcount(m) for m in modules]
    for _ in range(200):
        watch = _watch_or_skip(modules)
        assert fast_path.unchanged_since(watch)
        del watch
    assert [sys.getrefcount(m) for m in modules] == before


def test_module_watch_without_the_extension(monkeypatch):
    monkeypatch.setattr(_library, "compiled_function", lambda name: None)
    assert fast_path.module_watch([nn.Linear(2, 2)]) is None
    assert fast_path.unchanged_since(None) is False
