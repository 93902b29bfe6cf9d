"""One rank of a gloo group, run by test_vocab_parallel.py: argv world rank port. Every rank runs every case
on its shard of the same logits and prints "CASE <rank> <name> ok" (its loss and its shard's gradient equal
the float64 reference on the gathered logits) or "CASE <rank> <name> FAIL <why>", then "all cases ran".
The rank ends itself if its parent does, and a stuck collective times out (gloo's timeout)."""
import datetime
import os
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from el_fairseq import EncouragingLoss, encouraging_loss  # noqa: E402
from el_fairseq.parallel import vocab_parallel_encouraging_loss  # noqa: E402
from reference64 import torch_el_loss64  # noqa: E402

V, N = 101, 24
# shard sizes per world size: uneven, a one-class shard, an empty one (rank 1 of 4)
LAYOUTS = {1: [101], 2: [60, 41], 3: [50, 50, 1], 4: [30, 0, 70, 1]}
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6), torch.bfloat16: (3e-2, 3e-2)}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "scatter", "gather")


def watch_parent():
    """End this process (no cleanup: it may be inside a collective) once the test that started it is gone."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def end_finished(status=0):
    """End a rank that has finished (its group destroyed) without interpreter shutdown: objects still holding
    the gloo group (a DDP model, DeepSpeed's engine, DTensor meshes) are then destroyed in no set order and
    gloo's threads can abort the finished process (SIGABRT, "terminate called without an active exception"),
    as el_fairseq/criterions/spawned_worker.py found for fairseq's workers. A rank that raised exits normally,
    so its traceback is reported."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


class Counter:
    """Counts the calls of torch.distributed's collectives and of the functional collectives (DTensor's)."""

    def __init__(self):
        import torch.distributed._functional_collectives as funcol
        self.calls = []
        for module, names in ((dist, COLLECTIVES), (funcol, [n for n in dir(funcol) if n.startswith(
                ("all_", "reduce_scatter", "broadcast", "permute"))])):
            for name in names:
                original = getattr(module, name, None)
                if callable(original):
                    setattr(module, name, self.wrap(name, original))

    def wrap(self, name, original):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)
        return counted

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def data(seed=0):
    """Logits (N, V) float64 and targets: both ends of the vocabulary, every shard boundary, an ignored row,
    confident rows (p_y near 1: log_end's tangent branch; 1 - p_y ~ 1e-9), a confident wrong row, a tie."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 2.5
    t = torch.randint(0, V, (N,), generator=g)
    t[:10] = torch.tensor([0, V - 1, 29, 30, 49, 50, 59, 60, 99, 100])
    t[10] = -100
    for row, boost in ((0, 25.0), (1, 25.0), (3, 12.0), (7, 6.0), (12, 20.0)):
        z[row, t[row]] += boost
    z[13, (int(t[13]) + 40) % V] += 25.0  # confidently wrong: the top class is not y
    z[14, 59] = z[14, 60] = z[14].max() + 3.0  # two top classes across a shard boundary
    t[14] = 60
    return z, t


def starts(sizes):
    return [sum(sizes[:r]) for r in range(len(sizes))]


def close(got, want, dtype, what):
    rtol, atol = TOL[dtype]
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    both_nan = got.isnan() & want.isnan()
    err = (got - want).masked_fill(both_nan, 0).abs()
    scale = want.masked_fill(both_nan, 0).abs().max() if want.numel() else 0.0
    assert bool((err <= rtol * scale + atol).all()), f"{what}: max error {float(err.max())} (scale {float(scale)})"


class Rank:
    def __init__(self, world, rank):
        self.world, self.rank = world, rank
        self.sizes = LAYOUTS[world]
        self.start = starts(self.sizes)[rank]
        self.stop = self.start + self.sizes[rank]
        self.counter = Counter()
        self.failures = 0

    def run(self, name, fn):
        try:
            fn()
        except Exception as err:  # noqa: BLE001  (reported, then the next case)
            self.failures += 1
            text = " ".join(str(err).split())
            print(f"CASE {self.rank} {name} FAIL {type(err).__name__}: {text[:500]}", flush=True)
            return
        print(f"CASE {self.rank} {name} ok", flush=True)

    def parallel(self, full, target, dtype, counts=None, **options):
        """This rank's (loss, shard gradient) of the logits `full` in `dtype`, and the collectives counted."""
        shard = full.to(dtype)[:, self.start:self.stop].detach().clone().requires_grad_(True)
        self.counter.take()
        loss = vocab_parallel_encouraging_loss(shard, target, group=None, vocab_start=self.start, **options)
        forward = self.counter.take()
        (loss.sum() if loss.dim() else loss).backward()
        backward = self.counter.take()
        if counts is not None:
            assert (len(forward), len(backward)) == counts, f"collectives: forward {forward}, backward {backward}"
        return loss, shard.grad

    def reference(self, full, target, dtype, **options):
        z = full.to(dtype).double().detach().clone().requires_grad_(True)  # the same values, in float64
        loss = encouraging_loss(z, target, impl="reference", **options)
        (loss.sum() if loss.dim() else loss).backward()
        return loss, z.grad[:, self.start:self.stop]

    def compare(self, full, target, dtype, counts=None, **options):
        loss, grad = self.parallel(full, target, dtype, counts, **options)
        want, want_grad = self.reference(full, target, dtype, **options)
        assert loss.dtype == dtype, loss.dtype
        close(loss, want, dtype, "loss")
        close(grad, want_grad, dtype, "gradient")
        return loss, grad


def option_sets(weight):
    return {
        "default": {},
        "ce": {"bonus_rho": 0.0},
        "ce-smoothed-weighted": {"bonus_rho": 0.0, "label_smoothing": 0.1, "weight": weight},
        "smoothing": {"label_smoothing": 0.1},
        "bonus-smoothing": {"bonus_label_smoothing": 0.2},
        "both-smoothings-weighted": {"label_smoothing": 0.1, "bonus_label_smoothing": 0.3, "weight": weight},
        "weighted": {"weight": weight, "bonus_rho": 2.0},
        "power-start": {"bonus": "power", "bonus_gamma": 2.0, "bonus_start": 0.2, "weight": weight},
        "cosine": {"bonus": "cosine", "bonus_label_smoothing": 0.1, "bonus_rho": 0.5},
        "plain-log": {"log_end": 1.0, "bonus_label_smoothing": 0.2},
        "log-end-start": {"log_end": 0.5, "bonus_start": 0.1, "label_smoothing": 0.2, "bonus_label_smoothing": 0.1},
        "ignore-a-class": {"ignore_index": 30, "weight": weight, "label_smoothing": 0.05},
        "ce-smoothing-only": {"bonus_rho": 0.0, "bonus_label_smoothing": 0.5, "label_smoothing": 0.3},
    }


def value_cases(me):
    full, target = data()
    weight = torch.rand(V, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.25
    for name, options in option_sets(weight).items():
        spread = options.get("bonus_rho", 1.0) > 0 and options.get("bonus_label_smoothing", 0.0) > 0
        rows = target.masked_fill(target == -100, options.get("ignore_index", -100))
        for dtype in (torch.float64, torch.float32):
            for reduction in ("mean", "sum", "none"):
                me.run(f"{name}-{reduction}-{str(dtype)[6:]}", lambda: me.compare(
                    full, rows, dtype, (3 if spread else 2, 0), reduction=reduction, **options))

    def against_torch64():  # the independent float64 formula
        for reduction in ("mean", "sum", "none"):
            for options, eps_b in (({}, 0.0), ({"bonus_label_smoothing": 0.2, "label_smoothing": 0.1}, 0.2)):
                loss, _ = me.parallel(full, target, torch.float64, reduction=reduction, **options)
                close(loss, torch_el_loss64(full, target, reduction=reduction, eps_b=eps_b,
                                            label_smoothing=options.get("label_smoothing", 0.0)), torch.float64, "loss")
    me.run("torch-el-loss64", against_torch64)

    def against_cross_entropy():  # bonus_rho=0 is torch's cross-entropy, value and gradient
        for reduction in ("mean", "sum", "none"):
            for options in ({}, {"weight": weight, "label_smoothing": 0.1}, {"ignore_index": 60}):
                rows = target.masked_fill(target == -100, options.get("ignore_index", -100))
                loss, grad = me.parallel(full, rows, torch.float64, bonus_rho=0.0, reduction=reduction, **options)
                z = full.clone().requires_grad_(True)
                want = F.cross_entropy(z, rows, reduction=reduction, **options)
                (want.sum() if want.dim() else want).backward()
                close(loss, want, torch.float64, "loss")
                close(grad, z.grad[:, me.start:me.stop], torch.float64, "gradient")
    me.run("cross-entropy", against_cross_entropy)

    def bfloat16():
        loss, grad = me.compare(full, target, torch.bfloat16, (2, 0))
        assert grad.dtype == torch.bfloat16
    me.run("bfloat16", bfloat16)

    def nothing_counted():  # torch's nan, with a zero gradient
        for rows in (target.new_full((N,), -100), target[:0]):
            for weighted in (None, weight):
                loss, grad = me.parallel(full[: rows.numel()], rows, torch.float32, (2, 0), weight=weighted)
                assert bool(loss.isnan()) and bool((grad == 0).all()), (loss, grad)
                loss, grad = me.parallel(full[: rows.numel()], rows, torch.float32, reduction="sum")
                assert float(loss.detach()) == 0.0 and bool((grad == 0).all())
    me.run("nothing-counted", nothing_counted)

    def class_last_rows():  # logits (B, T, V_r) with targets (B, T), as Megatron's [s, b, v/tp]
        z3, t3 = full.view(4, 6, V), target.view(4, 6)
        shard = z3[..., me.start:me.stop].clone().requires_grad_(True)
        loss = vocab_parallel_encouraging_loss(shard, t3, group=None, vocab_start=me.start, reduction="none",
                                               label_smoothing=0.1, bonus_label_smoothing=0.1)
        assert loss.shape == (4, 6)
        loss.sum().backward()
        want, grad = me.reference(full, target, torch.float64, reduction="none", label_smoothing=0.1,
                                  bonus_label_smoothing=0.1)
        close(loss.reshape(-1), want, torch.float64, "loss")
        close(shard.grad.reshape(N, -1), grad, torch.float64, "gradient")
    me.run("class-last-rows", class_last_rows)

    def twice():  # backward keeps nothing it changes: a second backward (retain_graph) gives the same gradient
        shard = full[:, me.start:me.stop].clone().requires_grad_(True)
        loss = vocab_parallel_encouraging_loss(shard, target, group=None, vocab_start=me.start)
        first, = torch.autograd.grad(loss, shard, retain_graph=True)
        second, = torch.autograd.grad(loss, shard)
        assert torch.equal(first, second)
        try:
            torch.autograd.grad(vocab_parallel_encouraging_loss(shard, target, group=None, vocab_start=me.start),
                                shard, create_graph=True)[0].sum().backward()
        except RuntimeError as err:
            assert "once differentiable" in str(err), err
        else:
            raise AssertionError("double backward was not refused")
    me.run("backward-twice", twice)


def refused(fn, mine, others, me, culprit):
    """fn raises ValueError on every rank, one line: `mine` on the culprit rank(s), `others` elsewhere."""
    try:
        fn()
    except ValueError as err:
        text = str(err)
        assert "\n" not in text, text
        expected = mine if culprit is None or me.rank == culprit else others
        assert expected in text, f"{text!r} does not say {expected!r}"
        return
    raise AssertionError("not refused")


def error_cases(me):
    full, target = data()
    shard = full[:, me.start:me.stop]
    last = me.world - 1

    def call(start=None, rows=target, **options):
        vocab_parallel_encouraging_loss(shard, rows, group=None, vocab_start=me.start if start is None else start,
                                        **options)

    bad_start = -1 if me.rank == last else None
    me.run("error-vocab-start", lambda: refused(lambda: call(bad_start), "vocab_start -1 is out of range",
                                                f"rank {last} of the group refused", me, last))
    me.run("error-target-shape", lambda: refused(lambda: call(rows=target[:-1]),
                                                 "target shape (23,) does not match the logits shard", "", me, None))
    short = torch.ones(V - 1, dtype=torch.float64)  # the last shard's classes do not fit
    me.run("error-short-weight", lambda: refused(lambda: call(weight=short), "does not fit weight (100,)",
                                                 f"rank {last} of the group refused", me, last))
    me.run("error-long-weight", lambda: refused(lambda: call(weight=torch.ones(V + 5, dtype=torch.float64)),
                                                "weight (106,) does not match the 101 classes", "", me, None))
    me.run("error-target-range", lambda: refused(lambda: call(rows=target.clamp(min=0) + 1),
                                                 "target values must be in [0, 101)", "", me, None))
    if me.world > 1:  # the last rank claims the first classes: an overlap, a gap
        overlap = 0 if me.rank == last else None
        me.run("error-overlap", lambda: refused(lambda: call(overlap, rows=target.clamp(max=0)),
                                                "the logits shards do not tile the vocabulary", "", me, None))
    me.run("error-option", lambda: refused(lambda: call(log_end=0.0), "log_end 0.0 is out of range", "", me, None))
    me.run("error-float-target", lambda: refused(lambda: call(rows=target.double()),
                                                 "must be an integer tensor", "", me, None))


def dtensor_cases(me):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (me.world,))
    full, target = data()
    weight = torch.rand(V, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.25

    def check(logits, target, placement=Shard(1), counts=(2, 0), module=None, **options):
        """encouraging_loss (or `module`) of DTensor logits: a Replicate DTensor equal to the reference; the
        gradient a DTensor of the logits' placement, equal to the reference's; `counts` collectives."""
        z = logits.detach().requires_grad_(True)
        me.counter.take()
        loss = module(z, target) if module is not None else encouraging_loss(z, target, **options)
        forward = me.counter.take()
        assert isinstance(loss, DTensor) and loss.placements == (Replicate(),), loss
        (loss.sum() if loss.dim() else loss).backward()
        backward = me.counter.take()
        if counts is not None:
            assert (len(forward), len(backward)) == counts, f"collectives: forward {forward}, backward {backward}"
        assert isinstance(z.grad, DTensor) and z.grad.placements == (placement,), z.grad.placements
        plain = logits.full_tensor().double().requires_grad_(True)
        plain_target = target.full_tensor() if isinstance(target, DTensor) else target
        if module is not None:
            options = {"weight": module.weight, "label_smoothing": module.label_smoothing,
                       "reduction": module.reduction, "bonus_label_smoothing": module.spec.epsilon}
        options = {k: v for k, v in options.items() if k != "impl"}
        want = encouraging_loss(plain, plain_target, impl="reference", **options)
        (want.sum() if want.dim() else want).backward()
        dtype = logits.dtype
        close(loss.full_tensor(), want, dtype, "loss")
        close(z.grad.full_tensor(), plain.grad, dtype, "gradient")

    z32 = distribute_tensor(full.float(), mesh, [Shard(1)])
    me.run("dtensor-plain-target", lambda: check(z32, target))
    me.run("dtensor-replicated-target", lambda: check(z32, distribute_tensor(target, mesh, [Replicate()])))
    me.run("dtensor-float64-options", lambda: check(distribute_tensor(full, mesh, [Shard(1)]), target, counts=(3, 0),
                                                    weight=weight, label_smoothing=0.1, bonus_label_smoothing=0.2,
                                                    reduction="none"))
    me.run("dtensor-module", lambda: check(z32, target, module=EncouragingLoss(
        weight.float(), label_smoothing=0.1, bonus_label_smoothing=0.1, reduction="sum"), counts=(3, 0)))
    local = z32.to_local()
    me.run("dtensor-shard-minus-one", lambda: check(
        DTensor.from_local(local, mesh, [Shard(-1)], run_check=False, shape=z32.shape, stride=z32.stride()), target,
        placement=Shard(1)))  # DTensor keeps Shard(-1) as Shard(1)
    z3 = distribute_tensor(full.float().view(4, 6, V).movedim(-1, 1).contiguous(), mesh, [Shard(1)])  # (N, C, d)
    me.run("dtensor-3d", lambda: check(z3, target.view(4, 6), reduction="none"))
    small = distribute_tensor(full[:6, :5].float(), mesh, [Shard(1)])  # torch.chunk: 4 ranks hold 2, 2, 1, 0 classes
    me.run("dtensor-five-classes", lambda: check(small, torch.tensor([0, 4, 2, -100, 3, 1]), label_smoothing=0.2,
                                                 counts=(3, 0), bonus_label_smoothing=0.1))
    me.run("dtensor-replicated-logits", lambda: check(distribute_tensor(full.float(), mesh, [Replicate()]),
                                                      distribute_tensor(target, mesh, [Replicate()]),
                                                      placement=Replicate(), counts=None))
    me.run("dtensor-reference-gathers", lambda: check(z32, distribute_tensor(target, mesh, [Replicate()]),
                                                      placement=Replicate(), counts=None, impl="reference"))


def run_rank(rank_class, *case_groups):
    """Join the gloo group of argv (world rank port), run each group of cases on a rank_class(world, rank), then
    print "all cases ran"."""
    world, rank, port = (int(a) for a in sys.argv[1:4])
    watch_parent()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        me = rank_class(world, rank)
        for cases in case_groups:
            cases(me)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    print("all cases ran", flush=True)
    end_finished()


if __name__ == "__main__":
    run_rank(Rank, value_cases, error_cases, dtensor_cases)
