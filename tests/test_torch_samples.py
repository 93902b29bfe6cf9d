"""torch's own test inputs through ours: every sample of the OpInfo entries (op_db) for
nn.functional.cross_entropy and nn.functional.linear_cross_entropy (every variant) and of the ModuleInfo
entries (module_db) for nn.CrossEntropyLoss and nn.LinearCrossEntropyLoss, in float32 and float64, runs
through encouraging_loss / encouraging_linear_loss / EncouragingLoss / EncouragingLinearLoss:

- bonus off (bonus_rho=0): the value and the gradients w.r.t. every input that requires one (input,
  linear_weight, linear_bias, probability targets; a module's parameters) equal torch's own;
- bonus on (the defaults): they equal the independent float64 formula reference64.torch_el_loss64 of the
  logits torch's reference computes (linear_cross_entropy_loss_reference's reshape of F.linear).

The cases are generated from torch at collection time, so a torch that adds samples tests us on them.
torch's arguments are mapped to ours by name: `options` (a LinearCrossEntropyOptions chunking strategy)
is our `chunk_size` (its batch_chunk_size); a module is built with the same constructor arguments and
ours loads the torch module's state_dict (linear weights, class weights). A sample ours refuses on
purpose is in REFUSALS, with its reason; their count may only go down (MAX_REFUSED).
"""
import inspect
import random
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

# torch.testing._internal.common_utils freezes the torch.backends flags when imported (disable_global_flags,
# for torch's own suite); the rest of a pytest session may set them (transformers' full_determinism sets
# cudnn's), so they are put back as they were (the flag lives in torch.backends' original module dict).
_FROZEN = torch.backends.flags_frozen()
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = not _FROZEN

from el_fairseq import EncouragingLinearLoss, EncouragingLoss, encouraging_linear_loss, encouraging_loss  # noqa: E402
from reference64 import linear_logits64, torch_el_loss64  # noqa: E402

DTYPES = (torch.float32, torch.float64)
OPS = {"nn.functional.cross_entropy": (F.cross_entropy, encouraging_loss),
       "nn.functional.linear_cross_entropy": (F.linear_cross_entropy, encouraging_linear_loss)}
MODULES = {torch.nn.CrossEntropyLoss: EncouragingLoss, torch.nn.LinearCrossEntropyLoss: EncouragingLinearLoss}
# (value rtol, gradient rtol) against torch in the same dtype, and against the float64 formula; the
# absolute tolerance is rtol times the largest magnitude of the reference.
TOLERANCE = {torch.float32: ((2e-5, 1e-4), (1e-4, 1e-4)), torch.float64: ((1e-10, 1e-9), (1e-10, 1e-9))}


@dataclass
class Case:
    """One torch sample: `call` holds torch's arguments by name (a functional sample), or `construct` the
    module's constructor arguments and `call` its forward's (a module sample)."""
    name: str
    theirs: object  # torch's function or module class
    ours: object
    dtype: torch.dtype
    call: dict
    construct: dict = None

    @property
    def arguments(self):
        return {**(self.construct or {}), **self.call}


def _bound(fn, args, kwargs):
    bound = inspect.signature(fn).bind(*args, **kwargs)
    return dict(bound.arguments)


def _op_cases():
    for op in op_db:
        if op.name not in OPS:
            continue
        theirs, ours = OPS[op.name]
        label = op.name.split(".")[-1] + (f".{op.variant_test_name}" if op.variant_test_name else "")
        for dtype in DTYPES:
            torch.manual_seed(0)
            random.seed(0)
            for i, s in enumerate(op.sample_inputs("cpu", dtype, requires_grad=True)):
                call = _bound(theirs, (s.input, *s.args), s.kwargs)
                yield Case(f"{label}-{str(dtype)[6:]}-{i:03d}", theirs, ours, dtype, call)


def _module_cases():
    for info in module_db:
        if info.module_cls not in MODULES:
            continue
        for dtype in DTYPES:
            torch.manual_seed(0)
            random.seed(0)
            inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)
            for i, m in enumerate(inputs):
                construct = _bound(info.module_cls, m.constructor_input.args, m.constructor_input.kwargs)
                call = _bound(info.module_cls.forward, (None, *m.forward_input.args), m.forward_input.kwargs)
                del call["self"]
                yield Case(f"{info.name.split('.')[-1]}-{str(dtype)[6:]}-{i:03d}", info.module_cls,
                           MODULES[info.module_cls], dtype, call, construct)


CASES = [*_op_cases(), *_module_cases()]

# Samples ours refuses on purpose: (what, predicate on a Case, reason). None matches torch 2.13's samples.
REFUSALS = [
    ("size_average/reduce", lambda case: any(case.arguments.get(k) is not None for k in ("size_average", "reduce")),
     "deprecated since torch 0.4.1 (reduction= says it); encouraging_loss and EncouragingLoss do not take them"),
]
MAX_REFUSED = 0


def refusal(case):
    return next((reason for what, applies, reason in REFUSALS if applies(case)), None)


def _fresh(value, dtype=None):
    """A new leaf with the values of `value` (in `dtype` if floating point), requiring grad where it did."""
    if not torch.is_tensor(value):
        return value
    copy = value.detach().to(dtype) if dtype is not None and value.is_floating_point() else value.detach().clone()
    return copy.requires_grad_(value.requires_grad)


def _ours_options(arguments):
    """torch's arguments as ours: options -> chunk_size; the deprecated size_average and reduce dropped where
    None (their default), passed on (and refused, see REFUSALS) where set."""
    mapped = {k: v for k, v in arguments.items()
              if k != "options" and not (k in ("size_average", "reduce") and v is None)}
    if "options" in arguments:
        mapped["chunk_size"] = getattr(arguments["options"], "batch_chunk_size", None)
    return mapped


def _evaluate(case, which, el=None):
    """(output, [(name, leaf)]): the loss of `case` by torch ("theirs"), by ours ("ours", with the EL options
    `el`) or by the float64 formula ("formula"), on fresh leaves."""
    dtype = torch.float64 if which == "formula" else None
    call = {k: _fresh(v, dtype) for k, v in case.call.items()}
    leaves = [(k, v) for k, v in call.items() if torch.is_tensor(v) and v.requires_grad]
    if case.construct is None:
        if which == "formula":
            return _formula(call), leaves
        fn = case.theirs if which == "theirs" else case.ours
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: "options ignored" for what its chunked path does not take
            out = fn(**call) if which == "theirs" else fn(**_ours_options(call), **el)
        return out, leaves
    module = _modules(case, el if which == "ours" else None)
    if which == "formula":
        params = {k: p.detach().double().requires_grad_(True) for k, p in module.named_parameters()}
        return _formula({**call, **_module_as_call(case, params)}), leaves + list(params.items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module(**call), leaves + list(module.named_parameters())


def _modules(case, el):
    """torch's module from the case's constructor arguments (seeded), or ours (el: its EL options) with
    the torch module's state_dict: the same linear weights and class weights."""
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = case.theirs(**case.construct)
    if el is None:
        return theirs
    ours = case.ours(**_ours_options(case.construct), **el)
    ours.load_state_dict(theirs.state_dict())  # strict: the same names, as torch's module
    return ours


def _module_as_call(case, params):
    """A module sample's functional arguments: F.cross_entropy's for nn.CrossEntropyLoss, F.linear_cross_entropy's
    for nn.LinearCrossEntropyLoss (its linear's parameters reshaped as its forward does)."""
    call = {k: v for k, v in case.construct.items() if k in ("weight", "ignore_index", "reduction", "label_smoothing")}
    if case.theirs is torch.nn.LinearCrossEntropyLoss:
        shape = (case.construct["num_classes"], *case.construct.get("out_features", ()))
        call["linear_weight"] = params["linear.weight"].reshape(*shape, -1)
        call["linear_bias"] = params["linear.bias"].reshape(shape) if "linear.bias" in params else None
    return call


def _formula(call):
    """reference64.torch_el_loss64 (rho 1, the log bonus, log_end 0.75: our defaults) of the case's float64
    logits: the input itself (cross_entropy), or torch's reference reshape of F.linear (linear_cross_entropy:
    (N, C, d1, ...) from a weight (C, d1, ..., D))."""
    logits = call["input"]
    if "linear_weight" in call:
        logits = linear_logits64(logits, call["linear_weight"], call.get("linear_bias"))
    ignore_index = call.get("ignore_index")
    return torch_el_loss64(logits, call["target"], call.get("weight"), -100 if ignore_index is None else ignore_index,
                           call.get("reduction", "mean"), call.get("label_smoothing", 0.0))


def value_and_grads(case, which, el=None):
    out, leaves = _evaluate(case, which, el)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * r).sum(), [v for _, v in leaves], allow_unused=True)
    return out.detach(), dict(zip([k for k, _ in leaves], grads))


def assert_close(got, want, rtol, grad_rtol, what):
    (value, grads), (ref, ref_grads) = got, want
    assert value.shape == ref.shape, f"{what}: shape {tuple(value.shape)} != {tuple(ref.shape)}"
    assert torch.allclose(value.double(), ref.double(), rtol=rtol, atol=rtol * _scale(ref), equal_nan=True), \
        f"{what}: value {value} != {ref}"
    assert list(grads) == list(ref_grads), f"{what}: gradients of {list(grads)} != {list(ref_grads)}"
    for name, ref_grad in ref_grads.items():
        assert grads[name] is not None, f"{what}: no gradient for {name}"
        assert torch.allclose(grads[name].double(), ref_grad.double(), rtol=grad_rtol,
                              atol=grad_rtol * _scale(ref_grad), equal_nan=True), \
            f"{what}: gradient of {name}, max error {(grads[name].double() - ref_grad.double()).abs().max()}"


def _scale(t):
    finite = t.detach().double()[torch.isfinite(t.detach())]
    return float(finite.abs().max()) if finite.numel() else 1.0


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_torch_sample(case):
    reason = refusal(case)
    if reason is not None:
        with pytest.raises((TypeError, ValueError)):
            _evaluate(case, "ours", {"bonus_rho": 0.0})
        return
    (torch_tol, formula_tol) = TOLERANCE[case.dtype]
    assert_close(value_and_grads(case, "ours", {"bonus_rho": 0.0}), value_and_grads(case, "theirs"), *torch_tol,
                 "bonus off vs torch")
    assert_close(value_and_grads(case, "ours", {}), value_and_grads(case, "formula"), *formula_tol,
                 "bonus on vs the float64 formula")


def test_every_kind_of_sample_is_there_and_refusals_only_go_down():
    kinds = {c.name.split("-")[0] for c in CASES}
    assert kinds >= {"cross_entropy", "linear_cross_entropy", "linear_cross_entropy.chunked",
                     "linear_cross_entropy.chunked_none", "CrossEntropyLoss", "LinearCrossEntropyLoss"}, kinds
    refused = [(c.name, refusal(c)) for c in CASES if refusal(c) is not None]
    assert len(refused) <= MAX_REFUSED, refused
    assert torch.backends.flags_frozen() == _FROZEN  # torch.backends left as this module found it
