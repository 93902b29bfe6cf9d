"""One rank of a gloo group, run by test_vocab_parallel_linear.py: argv world rank port. Every rank runs every case
with its rows of the same projection and prints "CASE <rank> <name> ok" (its loss, the input's gradient and its
slice of the weight and bias gradients equal the float64 reference of the full projection) or
"CASE <rank> <name> FAIL <why>", then "all cases ran". Helpers (shard layouts, the collective counter, the
option sets, the parent watch) are vocab_parallel_child.py's."""
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from el_fairseq import EncouragingLinearLoss, encouraging_linear_loss, encouraging_loss  # noqa: E402
from el_fairseq.parallel import vocab_parallel_encouraging_linear_loss  # noqa: E402
import vocab_parallel_child  # noqa: E402
from vocab_parallel_child import close, option_sets, refused, run_rank  # noqa: E402

V, N, D = 101, 23, 8
CHUNKS = (5, 7, None)  # rows 5+5+5+5+3, 7+7+7+2, and the default: one chunk of all 23 (default_chunk_size(101))


def data(seed=0):
    """x (N, D), W (V, D), b (V,) float64 and targets: both ends of the vocabulary, every shard boundary, an
    ignored row; columns 0-3 of x and W are 0 but for confident rows 0, 1 and 12 (their target's logit 25 above:
    1 - p_y ~ 1e-9, log_end's tangent branch) and row 13, confidently wrong (class 47 25 above, target 7)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(V, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    t[:10] = torch.tensor([0, V - 1, 29, 30, 49, 50, 59, 60, 99, 100])
    t[10], t[12], t[13] = -100, 50, 7
    x[:, :4] = 0.0
    w[:, :4] = 0.0
    for column, (row, boosted) in enumerate(((0, 0), (1, V - 1), (12, 50), (13, 47))):
        x[row, column], w[boosted, column] = 25.0, 1.0
    return x, w, b, t


class Rank(vocab_parallel_child.Rank):
    """A rank holding the rows [start, stop) of the projection (vocab_parallel_child.LAYOUTS)."""

    def parallel(self, tensors, target, dtype, counts=None, grads=(True, True, True), **options):
        """This rank's (loss, grad x, grad W_r, grad b_r) of the full float64 `tensors` (x, W, b or None) in
        `dtype`, and `counts` = (forward, backward) collectives checked; grads: which of x, W_r, b_r require one."""
        x, w, b = tensors
        own = [x.to(dtype), w.to(dtype)[self.start:self.stop], None if b is None else b.to(dtype)[self.start:self.stop]]
        own = [None if t is None else t.clone().requires_grad_(want) for t, want in zip(own, grads)]
        self.counter.take()
        loss = vocab_parallel_encouraging_linear_loss(own[0], own[1], target, group=None, vocab_start=self.start,
                                                      linear_bias=own[2], **options)
        forward = self.counter.take()
        if loss.requires_grad:
            (loss.sum() if loss.dim() else loss).backward()
        backward = self.counter.take()
        if counts is not None:
            assert (len(forward), len(backward)) == counts, f"collectives: forward {forward}, backward {backward}"
        return loss, *(None if t is None else t.grad for t in own)

    def reference(self, tensors, target, dtype, **options):
        """encouraging_loss of the full logits F.linear(x, W, b) in float64 of the `dtype` values, and the gradients
        of x, W[start:stop], b[start:stop]."""
        options = {k: v for k, v in options.items() if k != "chunk_size"}
        full = [None if t is None else t.to(dtype).double().clone().requires_grad_(True) for t in tensors]
        loss = encouraging_loss(F.linear(*full), target, impl="reference", **options)
        (loss.sum() if loss.dim() else loss).backward()
        rows = slice(self.start, self.stop)
        return loss, full[0].grad, full[1].grad[rows], None if full[2] is None else full[2].grad[rows]

    def compare(self, tensors, target, dtype, counts=None, **options):
        got = self.parallel(tensors, target, dtype, counts, **options)
        flat = (tensors[0].reshape(-1, D), *tensors[1:])  # the reference's logits (rows, V)
        want = self.reference(flat, target.reshape(-1), dtype, **options)
        assert got[0].dtype == dtype, got[0].dtype
        for what, a, b in zip(("loss", "input gradient", "weight gradient", "bias gradient"), got, want):
            if b is not None:
                close(a.reshape(b.shape), b, dtype, what)


def collectives(chunk_size, spread, rows=N, backward=1):
    """(forward, backward) counts: the agreement, then 2 per chunk (3 with bonus smoothing); the input gradient."""
    chunks = math.ceil(rows / (chunk_size or rows)) if rows else 0
    return 1 + (3 if spread else 2) * chunks, backward


def value_cases(me):
    *tensors, target = data()
    weight = torch.rand(V, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.25
    for i, (name, options) in enumerate(option_sets(weight).items()):
        spread = options.get("bonus_rho", 1.0) > 0 and options.get("bonus_label_smoothing", 0.0) > 0
        rows = target.masked_fill(target == -100, options.get("ignore_index", -100))
        for j, dtype in enumerate((torch.float64, torch.float32)):
            for k, reduction in enumerate(("mean", "sum", "none")):
                chunk = CHUNKS[(i + j + k) % len(CHUNKS)]
                me.run(f"{name}-{reduction}-{str(dtype)[6:]}-chunk{chunk}", lambda: me.compare(
                    tensors, rows, dtype, collectives(chunk, spread), reduction=reduction, chunk_size=chunk, **options))
    x, w, b = tensors

    def against_fused_linear():  # the one-process fused linear loss (native kernel per chunk), float32
        for options in ({}, {"label_smoothing": 0.1, "bonus_label_smoothing": 0.2}, {"reduction": "none"}):
            got = me.parallel((x, w, b), target, torch.float32, chunk_size=5, **options)
            full = [t.float().clone().requires_grad_(True) for t in (x, w, b)]
            want = encouraging_linear_loss(full[0], full[1], target, linear_bias=full[2], chunk_size=5, **options)
            (want.sum() if want.dim() else want).backward()
            rows = slice(me.start, me.stop)
            for a, e in zip(got, (want, full[0].grad, full[1].grad[rows], full[2].grad[rows])):
                close(a, e, torch.float32, "against encouraging_linear_loss")
    me.run("against-encouraging-linear-loss", against_fused_linear)
    me.run("no-bias", lambda: me.compare((x, w, None), target, torch.float64, collectives(7, False), chunk_size=7))
    me.run("input-without-grad", lambda: me.parallel((x, w, b), target, torch.float64, collectives(5, False, backward=0),
                                                     grads=(False, True, True), chunk_size=5))

    def weight_only():  # only W_r requires a gradient: no collective in backward
        _, gx, gw, gb = me.parallel((x, w, b), target, torch.float64, collectives(7, False, backward=0),
                                    grads=(False, True, False), chunk_size=7)
        assert gx is None and gb is None
        close(gw, me.reference((x, w, b), target, torch.float64)[2], torch.float64, "weight gradient")
    me.run("weight-only-grad", weight_only)

    def no_grad():
        with torch.no_grad():
            loss, *_ = me.parallel((x, w, b), target, torch.float64, collectives(5, True, backward=0),
                                   chunk_size=5, bonus_label_smoothing=0.1)
        close(loss, me.reference((x, w, b), target, torch.float64, bonus_label_smoothing=0.1)[0], torch.float64, "loss")
    me.run("no-grad", no_grad)
    me.run("rows-3d", lambda: me.compare((x[:18].view(3, 6, D), w, b), target[:18].view(3, 6), torch.float64, collectives(4, False, 18),
                                         reduction="none", chunk_size=4))

    def nothing_counted():  # torch's nan with zero gradients; the empty batch: the agreement only
        for rows in (target.new_full((N,), -100), target[:0]):
            loss, gx, gw, gb = me.parallel((x[:rows.numel()], w, b), rows, torch.float32,
                                           collectives(None, False, rows.numel()), chunk_size=None)
            assert bool(loss.isnan()), loss
            assert all(bool((g == 0).all()) for g in (gx, gw, gb))
    me.run("nothing-counted", nothing_counted)

    def none_twice():  # reduction "none": a second backward (retain_graph) recomputes the statistics, same gradient
        xs = x.clone().requires_grad_(True)
        loss = vocab_parallel_encouraging_linear_loss(xs, w[me.start:me.stop], target, group=None,
                                                      vocab_start=me.start, reduction="none", chunk_size=7)
        first, = torch.autograd.grad(loss.sum(), xs, retain_graph=True)
        second, = torch.autograd.grad(loss.sum(), xs)
        close(first, second, torch.float64, "second backward")
    me.run("none-backward-twice", none_twice)


def error_cases(me):
    x, w, b, target = data()
    last = me.world - 1
    culprit = me.rank == last

    def call(start=None, xs=x, ws=None, rows=target, **options):
        vocab_parallel_encouraging_linear_loss(xs, w[me.start:me.stop] if ws is None else ws, rows, group=None,
                                               vocab_start=me.start if start is None else start, **options)

    others = f"rank {last} of the group refused"
    me.run("error-vocab-start", lambda: refused(lambda: call(-1 if culprit else None),
                                                "vocab_start -1 is out of range", others, me, last))
    narrow = w[me.start:me.stop, :-1] if culprit else None
    me.run("error-weight-shape", lambda: refused(lambda: call(ws=narrow), "does not match input (23, 8)", others, me,
                                                 last))
    me.run("error-chunk-size", lambda: refused(lambda: call(chunk_size=0), "chunk_size 0 is not allowed", "", me, None))
    me.run("error-target-range", lambda: refused(lambda: call(rows=target.clamp(min=0) + 1),
                                                 "target values must be in [0, 101)", "", me, None))
    me.run("error-float-target", lambda: refused(lambda: call(rows=target.double()), "must be an integer tensor", "",
                                                 me, None))
    if me.world > 1:
        fewer = (x[:-1], target[:-1]) if culprit else (x, target)
        me.run("error-rows", lambda: refused(lambda: call(xs=fewer[0], rows=fewer[1]),
                                             "the ranks' inputs hold 22 to 23 rows", "", me, None))
        me.run("error-overlap", lambda: refused(lambda: call(0 if culprit else None, rows=target.clamp(max=0)),
                                                "the logits shards do not tile the vocabulary", "", me, None))


def dtensor_cases(me):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (me.world,))
    x, w, b, target = data()

    def check(loss, inputs, want_options, counts, forward):
        """loss: a Replicate DTensor equal to the reference; the gradients: DTensors of their tensor's placements
        (x: Replicate, W and b: Shard(0)) equal to the reference's; `counts` collectives."""
        assert isinstance(loss, DTensor) and loss.placements == (Replicate(),), loss
        (loss.sum() if loss.dim() else loss).backward()
        backward = me.counter.take()
        assert (len(forward), len(backward)) == counts, f"collectives: forward {forward}, backward {backward}"
        full = [t.float().double().clone().requires_grad_(True) for t in (x, w, b)]
        want = encouraging_loss(F.linear(*full), target, impl="reference", **want_options)
        (want.sum() if want.dim() else want).backward()
        close(loss.full_tensor(), want, torch.float32, "loss")
        for t, ref, placement in zip(inputs, full, (Replicate(), Shard(0), Shard(0))):
            grad = t.grad
            if isinstance(grad, DTensor):
                assert grad.placements == (placement,), grad.placements
                grad = grad.full_tensor()
            close(grad, ref.grad, torch.float32, "gradient")

    def functional(input_placement, **options):
        inputs = [distribute_tensor(x.float(), mesh, [input_placement]),
                  distribute_tensor(w.float(), mesh, [Shard(0)]), distribute_tensor(b.float(), mesh, [Shard(0)])]
        inputs = [t.detach().requires_grad_(True) for t in inputs]
        me.counter.take()
        loss = encouraging_linear_loss(inputs[0], inputs[1], target, linear_bias=inputs[2], **options)
        forward = me.counter.take()
        spread = options.get("bonus_label_smoothing", 0.0) > 0
        check(loss, inputs, {k: v for k, v in options.items() if k != "chunk_size"},
              collectives(options.get("chunk_size"), spread), forward)

    me.run("dtensor-replicated-input", lambda: functional(Replicate(), chunk_size=5, label_smoothing=0.1,
                                                          bonus_label_smoothing=0.2))
    me.run("dtensor-none", lambda: functional(Replicate(), reduction="none", log_end=0.5))
    # a plain input beside a row-sharded weight could be an FSDP2 shard with each rank's own batch: refused
    sharded_weight = distribute_tensor(w.float(), mesh, [Shard(0)])
    me.run("dtensor-plain-input-refused", lambda: refused(
        lambda: encouraging_linear_loss(x.float(), sharded_weight, target),
        "linear_weight is a DTensor sharded on its rows (Shard(dim=0),) and input a plain tensor", "", me, None))

    def module():  # EncouragingLinearLoss whose projection ColwiseParallel shards: weight and bias Shard(0)
        torch.manual_seed(0)
        head = EncouragingLinearLoss(D, V, bias=True, label_smoothing=0.1, reduction="sum", chunk_size=7)
        with torch.no_grad():
            head.linear.weight.copy_(w.float())
            head.linear.bias.copy_(b.float())
        parallelize_module(head.linear, mesh, ColwiseParallel())
        xs = x.float().clone().requires_grad_(True)
        me.counter.take()
        loss = head(xs, target)
        forward = me.counter.take()
        check(loss, (xs, head.linear.weight, head.linear.bias), {"label_smoothing": 0.1, "reduction": "sum"},
              collectives(7, False), forward)
    me.run("dtensor-module", module)


if __name__ == "__main__":
    run_rank(Rank, value_cases, error_cases, dtensor_cases)
