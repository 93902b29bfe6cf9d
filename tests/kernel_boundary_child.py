"""Run by test_kernel_boundaries.py in a child process, one group of cases per run: each case hands a
loss entry point (or a kernel itself) a tensor it may not read directly (16-bit, non-contiguous,
mis-sized, a DTensor) and prints one line, "CASE name ok" with the result checked against the float64
reference, or "CASE name refused <Type>: <one line>". A crash (SIGSEGV, a glibc abort) ends the child
without the closing line, which the test reports with the cases that ran. argv: group name."""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from el_fairseq import encouraging_linear_loss, encouraging_loss  # noqa: E402
from el_fairseq.loss import chunked, native, triton_kernel  # noqa: E402
from el_fairseq.loss.bonus import BonusSpec  # noqa: E402
from reference64 import torch_el_loss64  # noqa: E402

N, V, D = 13, 37, 8
REFUSALS = (ValueError, RuntimeError)  # KernelInputError is a ValueError; torch's own refusals RuntimeError


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, V, (N,), generator=g)
    t[2] = -100
    return z, t


def check_value(got, want, rtol):
    got, want = float(got.detach()), float(want)
    assert abs(got - want) <= rtol * abs(want) + 1e-6, (got, want)


def run(name, fn):
    try:
        fn()
    except REFUSALS as err:
        text = str(err)
        assert text and "\n" not in text.strip(), f"{name}: not a one-line error: {text!r}"
        print(f"CASE {name} refused {type(err).__name__}: {text}", flush=True)
        return
    print(f"CASE {name} ok", flush=True)


def logits_cases(impl):
    z64, t = data()
    want = torch_el_loss64(z64, t)
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}

    def value(z, target=t, rtol=1e-5, dtype=None):
        loss = encouraging_loss(z, target, impl=impl)
        assert loss.dtype == (dtype or z.dtype), loss.dtype
        check_value(loss, want, rtol)

    for dtype in (torch.bfloat16, torch.float16):
        run(f"{impl}-{dtype}", lambda: value(z64.to(dtype), rtol=tol[dtype]))
        with torch.autocast("cpu", dtype=dtype):  # torch's policy for cross_entropy: computed and returned in float32
            run(f"{impl}-autocast-{dtype}", lambda: value(z64.float(), rtol=1e-5))
            run(f"{impl}-autocast-{dtype}-input", lambda: value(z64.to(dtype), rtol=tol[dtype], dtype=torch.float32))
    run(f"{impl}-transposed", lambda: value(z64.float().t().contiguous().t()))
    run(f"{impl}-strided", lambda: value(torch.stack([z64, z64], -1).float()[..., 0]))  # column stride 2
    run(f"{impl}-column-slice", lambda: value(torch.cat([z64.float(), z64.float()], 1)[:, :V]))
    run(f"{impl}-short-target", lambda: encouraging_loss(z64.float(), t[:-1], impl=impl))
    run(f"{impl}-float-target-rows", lambda: encouraging_loss(z64.float(), t.float(), impl=impl))
    run(f"{impl}-empty", lambda: encouraging_loss(z64.float()[:0], t[:0], impl=impl, reduction="sum"))


def kernel_cases():
    z64, t = data()
    spec = BonusSpec()
    kernels = {"native": native.forward, "chunked": chunked.forward}
    if triton_kernel.available() and os.environ.get("TRITON_INTERPRET") == "1":
        kernels["triton"] = triton_kernel.forward
    for name, kernel in kernels.items():
        run(f"{name}-float64", lambda: kernel(z64, t, 0.1, spec, -100))
        run(f"{name}-bfloat16", lambda: kernel(z64.bfloat16(), t, 0.1, spec, -100))
        run(f"{name}-transposed", lambda: kernel(z64.float().t().contiguous().t(), t, 0.1, spec, -100))
        run(f"{name}-short-target", lambda: kernel(z64.float(), t[:-1], 0.1, spec, -100))
        run(f"{name}-2d-target", lambda: kernel(z64.float(), t.view(1, -1), 0.1, spec, -100))
        run(f"{name}-3d-logits", lambda: kernel(z64.float().view(1, N, V), t, 0.1, spec, -100))
        run(f"{name}-one-class", lambda: kernel(z64.float()[:, :1], t.clamp(max=0), 0.0, spec, -100))
        run(f"{name}-meta", lambda: kernel(z64.float().to("meta"), t.to("meta"), 0.1, spec, -100))
        run(f"{name}-sparse", lambda: kernel(z64.float().to_sparse(), t, 0.1, spec, -100))
    # the last gate before C: buffers of the wrong size or dtype never reach el_forward
    z = z64.float()
    loss, nll, stats = torch.empty(N), torch.empty(N), torch.empty(N, 2)
    run("native-gate-short-grad", lambda: native._check_buffers(N, V, z, t, loss, nll, stats, torch.empty(N - 1, V)))
    run("native-gate-half-loss", lambda: native._check_buffers(N, V, z, t, loss.half(), nll, stats, None))
    run("native-gate-int32-target", lambda: native._check_buffers(N, V, z, t.int(), loss, nll, stats, None))


def linear_cases(impl):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64)
    _, t = data()
    want = torch_el_loss64(F.linear(x, w), t)
    for dtype in (torch.bfloat16, torch.float16):
        run(f"linear-{impl}-{dtype}", lambda: check_value(
            encouraging_linear_loss(x.to(dtype), w.to(dtype), t, impl=impl), want, 5e-2))
        for grad in (False, True):
            def under_autocast():
                xs, ws = x.float().requires_grad_(grad), w.float().requires_grad_(grad)
                with torch.autocast("cpu", dtype=dtype):
                    loss = encouraging_linear_loss(xs, ws, t, impl=impl)
                assert loss.dtype == torch.float32, loss.dtype
                check_value(loss, want, 1e-5)
                if grad:
                    loss.backward()
                    assert bool(torch.isfinite(xs.grad).all() and torch.isfinite(ws.grad).all())
            run(f"linear-{impl}-autocast-{dtype}-grad{int(grad)}", under_autocast)
    run(f"linear-{impl}-transposed-weight", lambda: check_value(
        encouraging_linear_loss(x.float(), w.float().t().contiguous().t(), t, impl=impl), want, 1e-5))
    run(f"linear-{impl}-short-target", lambda: encouraging_linear_loss(x.float(), w.float(), t[:-1], impl=impl))


def dtensor_cases():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        z64, t = data()
        want = torch_el_loss64(z64, t)
        dz = distribute_tensor(z64.float(), mesh, [Shard(1)])  # a tensor-parallel head's logits
        dt = distribute_tensor(t, mesh, [Replicate()])
        for impl in ("auto", "reference", "native", "chunked"):
            def logits_loss():
                z = dz.detach().requires_grad_(True)
                loss = encouraging_loss(z, dt, impl=impl)
                check_value(loss.full_tensor(), want, 1e-5)
                loss.backward()
                assert bool(torch.isfinite(z.grad.full_tensor()).all())
            run(f"dtensor-logits-{impl}", logits_loss)
            run(f"dtensor-logits-plain-target-{impl}", lambda: check_value(
                encouraging_loss(dz, dt.full_tensor(), impl=impl).full_tensor(), want, 1e-5))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(N, D, generator=g, dtype=torch.float64)
        w = torch.randn(V, D, generator=g, dtype=torch.float64)
        want = torch_el_loss64(F.linear(x, w), t)
        dx = distribute_tensor(x.float(), mesh, [Replicate()])
        dw = distribute_tensor(w.float(), mesh, [Shard(0)])  # a vocabulary-parallel projection
        for impl in ("auto", "reference", "native", "chunked"):
            def linear_loss():  # "auto": the vocabulary-parallel linear loss; "reference": plain torch, gathered
                xs, ws = dx.detach().requires_grad_(True), dw.detach().requires_grad_(True)
                loss = encouraging_linear_loss(xs, ws, dt, impl=impl)
                check_value(loss.full_tensor(), want, 1e-5)
                loss.backward()
                if impl == "auto":
                    assert loss.placements == (Replicate(),), loss.placements
                    assert xs.grad.placements == (Replicate(),) and ws.grad.placements == (Shard(0),)
                assert bool(torch.isfinite(xs.grad.full_tensor()).all() and torch.isfinite(ws.grad.full_tensor()).all())
            run(f"dtensor-linear-{impl}", linear_loss)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    group = sys.argv[1]
    if group == "kernels":
        kernel_cases()
    elif group == "dtensor":
        dtensor_cases()
    elif group.startswith("linear-"):
        linear_cases(group[len("linear-"):])
    else:
        logits_cases(group)
    print("all cases ran", flush=True)
    if group == "dtensor":  # it joined a gloo group: end without interpreter shutdown (vocab_parallel_child)
        from vocab_parallel_child import end_finished
        end_finished()
