"""The boundary of every kernel entry (native C, Triton, chunked): what it is handed is checked there, so
that no buffer reaches a kernel in a dtype, layout, size, device or tensor type it does not handle.

A kernel reads raw memory (the native one through `data_ptr()`, the Triton one through pointers) or
allocates its outputs as plain tensors and writes them by index: it needs a plain dense tensor. A tensor
subclass (a DTensor, whose `data_ptr()` is 0), a sparse tensor or one on meta is not that, although plain
torch ops take it: the dispatcher (`impl="auto"`) sends such tensors to the plain-torch reference, and a
kernel named explicitly refuses them in one line. The kernels run as torch.library operators (ops.py):
what torch.compile traces them with (FakeTensors, functional tensors) reaches their fake kernels, and a
tensor batched by torch.func.vmap their vmap rule (`operator_input`); under the other torch.func
transforms (grad, jacrev, jvp, jacfwd) "auto" takes the reference and a named fused impl refuses.
"""
import torch


class KernelInputError(ValueError):
    """A kernel was handed a tensor it cannot read (one line: which tensor, what it is, what is allowed)."""


def _wrapped(tensor):
    functorch = getattr(torch._C, "_functorch", None)
    if functorch is not None and functorch.is_functorch_wrapped_tensor(tensor):
        return True
    return torch._is_functional_tensor(tensor)


def plain_dense(tensor) -> bool:
    """A plain strided tensor with real storage: not a subclass, a transform's wrapper, sparse or on meta."""
    return (type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.layout == torch.strided
            and not tensor.is_meta and not _wrapped(tensor))


def traced(tensor) -> bool:
    """A FakeTensor or a functional tensor: what torch.compile traces an operator's kernel with. It has no
    data; a kernel entry that a trace runs (the Triton operator's) only allocates outputs for it and records
    the launch."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(tensor, (FakeTensor, FunctionalTensor)) or torch._is_functional_tensor(tensor)


def readable(tensor) -> bool:
    """What a kernel entry takes: a plain dense tensor, or a traced one (compile)."""
    return plain_dense(tensor) or (tensor.layout == torch.strided and traced(tensor))


def operator_input(tensor, transforms=False) -> bool:
    """Whether the kernel operators (ops.py) take `tensor`: a plain dense tensor, one that torch.compile traces
    (inside a compiled function every tensor is a plain one to dynamo; a subclass such as DTensor is not),
    and, with `transforms`, one batched by torch.func.vmap (the operators' vmap rule unwraps it). A tensor
    that torch.func.grad / jacrev / jvp / jacfwd tracks is not: the operators' gradient is the kernel's own,
    which those transforms cannot see through (plain torch ops, impl "reference", can)."""
    if torch.compiler.is_compiling():
        return type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.layout == torch.strided
    if readable(tensor):
        return True
    functorch = getattr(torch._C, "_functorch", None)
    return (transforms and functorch is not None and functorch.is_batchedtensor(tensor)
            and type(tensor) in (torch.Tensor, torch.nn.Parameter))


def describe(tensor) -> str:
    kind = type(tensor).__name__
    wrapped = " (wrapped by a torch.func transform or functionalization)" if _wrapped(tensor) else ""
    return f"{kind}{wrapped} {tensor.dtype} {tuple(tensor.shape)} on {tensor.device.type}, layout {tensor.layout}"


def check(kernel, logits, target, dtypes, devices):
    """Raise KernelInputError unless `logits` is a plain dense (N, V) tensor of one of `dtypes` on one of
    `devices` (None: any), with V >= 2 classes (the kernels take the top two logits), and `target` a plain
    integer tensor (N,) on the same device. (Strides are each kernel's own business: the native one copies
    to contiguous memory and checks that again before its C call, the Triton one takes a row stride.)"""
    def refuse(name, tensor, allowed):
        raise KernelInputError(f"the {kernel} kernel cannot take {name} {describe(tensor)}: allowed {allowed}")

    allowed = (f"a plain dense (N, V >= 2) tensor of "
               f"{'/'.join(str(d).replace('torch.', '') for d in dtypes)} on {'/'.join(devices or ['any device'])}")
    if not torch.is_tensor(logits) or not readable(logits) or logits.dim() != 2 or logits.size(1) < 2 \
            or logits.dtype not in dtypes \
            or (devices is not None and logits.device.type not in devices):
        refuse("logits", logits, allowed)
    if not torch.is_tensor(target) or not readable(target) or tuple(target.shape) != (logits.size(0),) \
            or target.is_floating_point() or target.is_complex() or target.dtype == torch.bool \
            or target.device != logits.device:
        refuse("target", target, f"a plain integer tensor ({logits.size(0)},) on {logits.device}")
