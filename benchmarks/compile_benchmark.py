"""A small transformer LM's training step (forward + backward), eager against torch.compile, with cross-entropy
and with the encouraging loss, side by side in one run:

    head     CE                                                  EL
    logits   F.cross_entropy(head(h), y)                         encouraging_loss(head(h), y)
    linear   F.linear_cross_entropy(h, W, y, options=...)        encouraging_linear_loss(h, W, y)

    python -m benchmarks.compile_benchmark [--tokens 1024] [--seq 256] [--dim 256] [--layers 2] [--vocab 32000]
                                           [--heads logits linear] [--rounds 5] [--threads 1]
                                           [--device cpu|cuda] [--backend inductor] [--json OUT]

The model: a token embedding, --layers pre-norm blocks (causal scaled-dot-product attention with dim / 64 heads,
a GELU MLP of width 4 dim), a final LayerNorm and the output projection W (V, dim) without bias; the tokens are
--tokens / --seq sequences of --seq. EL options: the defaults (log bonus, LE 0.75, no smoothing); CE: none.
5% of the targets are ignored (-100). "logits" computes the (N, V) logits (EL: the native kernel for float32
CPU logits, Triton for CUDA ones); "linear" never holds them (torch's chunked F.linear_cross_entropy, the fused
linear EL).

Each head runs in a fresh process, which builds one model and times four steps on it: CE and EL, eager and
compiled (torch.compile of the model and the loss together, --backend, default inductor; AOTAutograd compiles
the backward too). Each step first runs once: "first s" is that call, the compilation included for compiled
steps. Then --rounds rounds, each timing every step once, in an order rotated per round; "time s" is the
median over rounds. Ratios in the same run, each the median over rounds of the ratio of two steps' times in
the same round (a load that drifts between rounds, on a shared machine, moves both alike): compiled / eager
for each loss ("x eager"), EL / CE for each mode ("x CE"). The goal (issue 26): compiled EL no slower than
eager EL, and EL / CE compiled no worse than EL / CE eager. "breaks" counts dynamo's graph breaks in
compiling the step (0: one graph). The compiled loss must equal the eager one (checked at the first call).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from el_fairseq import encouraging_linear_loss, encouraging_loss

HEADS = ("logits", "linear")
STEPS = (("ce", "eager"), ("el", "eager"), ("ce", "compiled"), ("el", "compiled"))


def build_model(vocab, dim, layers):
    """The small pre-norm transformer LM of the module docstring (a torch.nn.Module; `features` gives h)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = max(1, dim // 64)
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(attention.transpose(1, 2).reshape(b, t, dim))
            return x + self.down(F.gelu(self.up(self.norm2(x))))

    class SmallLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, vocab, bias=False)

        def features(self, tokens):
            """The last hidden state h (N, dim) of tokens (B, T)."""
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x)
            return self.norm(x).reshape(-1, dim)

    return SmallLM()


# One function per (head, loss), each its own code object: dynamo caches compiled code per code object.
# EL's impl (--el-impl; "auto": the kernel operators; "reference": plain torch ops, which inductor fuses).
EL_IMPL = "auto"


def ce_logits(model, tokens, target):
    return F.cross_entropy(model.head(model.features(tokens)), target)


def el_logits(model, tokens, target):
    return encouraging_loss(model.head(model.features(tokens)), target, impl=EL_IMPL)


def ce_linear(model, tokens, target):
    return F.linear_cross_entropy(model.features(tokens), model.head.weight, target, ignore_index=-100,
                                  options=torch.nn.LinearCrossEntropyOptions())


def el_linear(model, tokens, target):
    return encouraging_linear_loss(model.features(tokens), model.head.weight, target, impl=EL_IMPL)


LOSSES = {("logits", "ce"): ce_logits, ("logits", "el"): el_logits, ("linear", "ce"): ce_linear,
          ("linear", "el"): el_linear}


def worker(head, tokens, seq, dim, layers, vocab, rounds, threads, device, backend, el_impl="auto"):
    global EL_IMPL
    EL_IMPL = el_impl
    """The four steps' rows for one head (module docstring)."""
    from torch._dynamo.utils import counters

    torch.set_num_threads(threads)
    torch._inductor.config.compile_threads = 1  # compile in this process: no worker pool beside the timed steps
    torch.manual_seed(0)
    model = build_model(vocab, dim, layers).to(device)
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, vocab, (tokens // seq, seq), generator=g)
    target = torch.randint(0, vocab, (tokens // seq * seq,), generator=g)
    target[-target.numel() // 20:] = -100
    inputs, target = inputs.to(device), target.to(device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    functions = {}
    for loss, mode in STEPS:
        function = LOSSES[head, loss]
        functions[loss, mode] = function if mode == "eager" else torch.compile(function, backend=backend)

    def step(key):
        model.zero_grad(set_to_none=True)
        value = functions[key](model, inputs, target)
        value.backward()
        sync()
        return value.detach()

    first, values, breaks = {}, {}, {}
    for key in STEPS:
        counters.clear()
        sync()
        start = time.perf_counter()
        values[key] = step(key)
        first[key] = time.perf_counter() - start
        breaks[key] = sum(counters["graph_break"].values())
    for loss in ("ce", "el"):  # the same loss compiled and eagerly (float32: reordered sums only)
        eager, compiled = values[loss, "eager"], values[loss, "compiled"]
        if not torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5):
            raise SystemExit(f"{head} {loss}: compiled loss {float(compiled)} != eager {float(eager)}")
    times = {key: [] for key in STEPS}
    for r in range(rounds):
        for key in STEPS[r % len(STEPS):] + STEPS[:r % len(STEPS)]:
            start = time.perf_counter()
            step(key)
            times[key].append(time.perf_counter() - start)
    return [{"head": head, "loss": loss, "mode": mode, "tokens": tokens, "seq": seq, "dim": dim, "layers": layers,
             "vocab": vocab, "threads": threads, "device": device, "dtype": "float32",
             "backend": backend if mode == "compiled" else None, "loss_value": float(values[loss, mode]),
             "first_s": first[loss, mode], "median_s": statistics.median(times[loss, mode]),
             "round_s": times[loss, mode], "graph_breaks": breaks[loss, mode]} for loss, mode in STEPS]


def paired_ratio(row, other):
    """The median over rounds of row's time / other's in the same round: a load that drifts between rounds
    (a shared machine) moves both times of a round alike and cancels in their ratio."""
    return statistics.median(a / b for a, b in zip(row["round_s"], other["round_s"]))


def add_ratios(rows):
    """compiled / eager per (head, loss) and EL / CE per (head, mode), each row against its pair (paired_ratio)."""
    by = {(r["head"], r["loss"], r["mode"]): r for r in rows}
    for r in rows:
        r["x_eager"] = paired_ratio(r, by[r["head"], r["loss"], "eager"])
        r["x_ce"] = paired_ratio(r, by[r["head"], "ce", r["mode"]])
    return rows


def goals(rows):
    """Per head: compiled EL / eager EL, and (EL / CE compiled) / (EL / CE eager), each the median over rounds
    of the ratio within a round; both <= 1 is the goal."""
    by = {(r["head"], r["loss"], r["mode"]): r for r in rows}

    def el_over_ce_ratio(head):
        eager, compiled = (zip(by[head, "el", mode]["round_s"], by[head, "ce", mode]["round_s"])
                           for mode in ("eager", "compiled"))
        return statistics.median((el_c / ce_c) / (el_e / ce_e) for (el_e, ce_e), (el_c, ce_c) in zip(eager, compiled))

    return {head: {"compiled_el_over_eager_el": by[head, "el", "compiled"]["x_eager"],
                   "el_over_ce_compiled_over_eager": el_over_ce_ratio(head)}
            for head in dict.fromkeys(r["head"] for r in rows)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (--tokens is a multiple)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend (default: %(default)s)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--el-impl", choices=["auto", "reference", "chunked"], default="auto",
                        help="EL's impl (default: %(default)s; reference: plain torch ops, which inductor fuses)")
    parser.add_argument("--worker", choices=HEADS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tokens < args.seq or args.tokens % args.seq:
        parser.error(f"--tokens {args.tokens}: must be a positive multiple of --seq {args.seq}")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be at least 1")
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens, args.seq, args.dim, args.layers, args.vocab, args.rounds,
                                args.threads, args.device, args.backend, args.el_impl)))
        return

    from benchmarks.loss_benchmark import describe_machine

    machine = describe_machine(args.device, args.threads)
    print(f"{args.device.upper()}: {machine}")
    print(f"training step (forward + backward), float32: N {args.tokens} ({args.tokens // args.seq} x {args.seq}), "
          f"D {args.dim}, {args.layers} layers, V {args.vocab}; EL impl {args.el_impl!r}; eager vs "
          f"torch.compile(backend={args.backend!r}); "
          f"median of {args.rounds} rounds")
    print(f"{'head':<7} {'loss':<4} {'mode':<9} {'first s':>8} {'time s':>8} {'x eager':>8} {'x CE':>6} {'breaks':>6}")
    rows = []
    for head in args.heads:
        cmd = [sys.executable, "-m", "benchmarks.compile_benchmark", "--worker", head, "--tokens", str(args.tokens),
               "--seq", str(args.seq), "--dim", str(args.dim), "--layers", str(args.layers), "--vocab",
               str(args.vocab), "--rounds", str(args.rounds), "--threads", str(args.threads), "--device",
               args.device, "--backend", args.backend, "--el-impl", args.el_impl]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(
            args.threads)}, cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        if out.returncode != 0:
            raise SystemExit(f"benchmark worker {head} failed:\n{out.stderr[-3000:]}")
        head_rows = add_ratios(json.loads(out.stdout.strip().splitlines()[-1]))
        rows += head_rows
        for r in head_rows:
            print(f"{r['head']:<7} {r['loss'].upper():<4} {r['mode']:<9} {r['first_s']:>8.2f} {r['median_s']:>8.3f} "
                  f"{r['x_eager']:>8.2f} {r['x_ce']:>6.2f} {r['graph_breaks']:>6}", flush=True)
    summary = goals(rows)
    for head, g in summary.items():
        print(f"{head}: compiled EL / eager EL {g['compiled_el_over_eager_el']:.2f} (goal <= 1); "
              f"(EL/CE compiled) / (EL/CE eager) {g['el_over_ce_compiled_over_eager']:.2f} (goal <= 1)")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"command": "python -m benchmarks.compile_benchmark " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv),
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine,
                       "backend": args.backend, "el_impl": args.el_impl, "goals": summary, "rows": rows}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
