"""The vocabulary-parallel encouraging loss (el_fairseq.parallel) on gloo process groups of CPU processes, against
the one-process loss measured side by side in the same run, forward + backward, float32:

    el_logits   encouraging_loss(z, y), z (N, V)                                        one process (native kernel)
    vp_logits   vocab_parallel_encouraging_loss(z_r, y, ...), z_r (N, V_r)              TP processes, one group
    el_linear   encouraging_linear_loss(x, W, y), x (N, D), W (V, D)                    one process (fused, native)
    vp_linear   vocab_parallel_encouraging_linear_loss(x, W_r, y, ...), W_r (V_r, D)    TP processes, one group

    python -m benchmarks.vocab_parallel_benchmark [--tokens 1024] [--dim 128] [--vocabs 128256] [--worlds 1 2 4]
                                                  [--kinds logits linear] [--repeats 3] [--json OUT]

Each configuration runs in fresh processes (a fresh process group for the parallel ones), one thread each; the
shards split V as DTensor's Shard does (ceil(V / TP) classes per rank, the last fewer). The inputs are the same
numbers in every configuration (drawn in blocks, whatever a process holds), so every loss must agree. EL options:
the defaults (log bonus, LE 0.75, no smoothing); 5% of the targets ignored (-100). Each process first runs one
step on tiny inputs (16 tokens, 64 classes), which loads what a process loads once (libraries' workspaces, the
native kernel and its self-check, gloo's buffers), then draws its inputs. Per rank:
  peak    RSS high-water mark minus the RSS once the inputs exist (so it counts the gradients: z_r's; x's and
          W_r's), in the first step on them; the table gives the largest rank's, the goal being 1/TP of the
          one-process loss's (within 10%). Twice: in the timed run, with glibc's default malloc (as
          linear_benchmark measures; its reuse of freed heap makes identical ranks differ by several MiB), and in
          a second run of the same configuration, "live", with glibc's mmap threshold fixed at 128 KiB
          (LIVE_BUFFERS), so that every buffer above it is mapped when allocated and unmapped when freed: the
          high-water mark of the live buffers, the same on identical ranks (the allocator then costs time, so
          that run is not timed);
  bytes   the payload of the collectives (torch.distributed's, wrapped and counted) in one step per token:
          O(1) in V for the logits' statistics, plus the (N, D) input gradient for the linear loss (a ring
          all-reduce moves about 2 (TP - 1) / TP times the payload per rank);
  time    the median of --repeats forward + backward steps after that first one, the slowest rank's; x 1-proc =
          over the one-process loss of the same kind, measured in the same run. More processes than cores share
          the cores (oversubscribed): the time ratio then says little about a machine with a core per rank.
"""
import argparse
import datetime
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

METHODS = {"logits": ("el_logits", "vp_logits"), "linear": ("el_linear", "vp_linear")}
LABELS = {"el_logits": "EL logits, 1 process", "vp_logits": "vocab-parallel logits", "el_linear":
          "EL fused linear, 1 process", "vp_linear": "vocab-parallel fused linear"}
BLOCK = 1024  # rows of the drawn matrices per seed
WARM_UP_TOKENS, WARM_UP_VOCAB = 16, 64  # a first step this small loads what a process loads once
# glibc: every allocation above 128 KiB its own mapping, unmapped when freed (no dynamic threshold, no reuse)
LIVE_BUFFERS = {"MALLOC_MMAP_THRESHOLD_": "131072"}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor",
               "all_to_all_single", "reduce", "gather", "scatter")


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def shard_range(vocab, world, rank):
    """[start, stop) of `rank`'s classes, split as DTensor's Shard (torch.chunk): ceil(V / world) per rank."""
    size = -(-vocab // world)
    return min(rank * size, vocab), min((rank + 1) * size, vocab)


def fill_rows(out, first, seed, scale=1.0):
    """out (R_r, K) = rows [first, first + R_r) of a matrix (R, K) whose row block k (BLOCK rows) is drawn from seed
    (seed, k): the same numbers in every process whatever rows it holds; temporaries of one block, so that the
    RSS high-water mark stays that of the inputs."""
    import torch

    rows, g = out.size(0), torch.Generator()
    for k in range(first // BLOCK, -(-(first + rows) // BLOCK)):
        g.manual_seed(seed * 1_000_003 + k)
        block = torch.randn(BLOCK, out.size(1), generator=g).mul_(scale)
        lo, hi = max(first, k * BLOCK), min(first + rows, (k + 1) * BLOCK)
        out[lo - first:hi - first].copy_(block[lo - k * BLOCK:hi - k * BLOCK])


class PayloadCounter:
    """Counts the calls of torch.distributed's collectives and the bytes of the tensors they are handed."""

    def __init__(self):
        import torch.distributed as dist

        self.calls, self.bytes = 0, 0
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if callable(original):
                setattr(dist, name, self.wrap(original))

    def wrap(self, original):
        def counted(tensor, *args, **kwargs):
            self.calls += 1
            self.bytes += tensor.numel() * tensor.element_size()
            return original(tensor, *args, **kwargs)
        return counted

    def take(self):
        taken = (self.calls, self.bytes)
        self.calls, self.bytes = 0, 0
        return taken


def inputs(method, tokens, dim, vocab, start, stop):
    """The tensors of `method` for classes [start, stop): the target (N,) and what requires a gradient."""
    import torch

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, vocab, (tokens,), generator=g)
    y[-tokens // 20:] = -100
    if method.endswith("logits"):  # z (N, V_r) = the columns [start, stop) of z (N, V), drawn as rows of z^T
        z = torch.empty(tokens, stop - start)
        fill_rows(z.t(), start, seed=1, scale=2.0)
        return y, [z.requires_grad_(True)]
    x, w = torch.empty(tokens, dim), torch.empty(stop - start, dim)
    fill_rows(x, 0, seed=2)
    fill_rows(w, start, seed=3, scale=dim ** -0.5)
    return y, [x.requires_grad_(True), w.requires_grad_(True)]


def loss_function(method, start):
    from el_fairseq import encouraging_linear_loss, encouraging_loss
    from el_fairseq.parallel import vocab_parallel_encouraging_linear_loss, vocab_parallel_encouraging_loss

    return {"el_logits": lambda y, z: encouraging_loss(z, y),
            "vp_logits": lambda y, z: vocab_parallel_encouraging_loss(z, y, group=None, vocab_start=start),
            "el_linear": lambda y, x, w: encouraging_linear_loss(x, w, y),
            "vp_linear": lambda y, x, w: vocab_parallel_encouraging_linear_loss(x, w, y, group=None,
                                                                               vocab_start=start)}[method]


def step(loss_of, y, tensors):
    """One forward + backward; the loss's value."""
    for t in tensors:
        t.grad = None
    loss = loss_of(y, *tensors)
    loss.backward()
    return float(loss)


def worker(method, world, rank, port, tokens, dim, vocab, repeats):
    """One process's row: the peak and the collectives of the first step on the inputs, then `repeats` timed steps."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    parallel = method.startswith("vp_")
    if parallel:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
    counter = PayloadCounter()
    start, stop = shard_range(WARM_UP_VOCAB, world, rank) if parallel else (0, WARM_UP_VOCAB)
    step(loss_function(method, start), *inputs(method, WARM_UP_TOKENS, dim, WARM_UP_VOCAB, start, stop))
    start, stop = shard_range(vocab, world, rank) if parallel else (0, vocab)
    y, tensors = inputs(method, tokens, dim, vocab, start, stop)
    loss_of = loss_function(method, start)
    counter.take()
    # torch imports its compiler (torch._dynamo, ~140 MiB of RSS, once per process) at the first call of any
    # torch.library custom op, as the losses' kernels are since issue 26: imported before the baseline, so
    # that the peak is the step's memory, not that import.
    import torch._dynamo  # noqa: F401
    base = _rss_bytes()
    value = step(loss_of, y, tensors)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    calls, sent = counter.take()
    seconds = []
    for _ in range(repeats):
        if parallel:
            dist.barrier()
        begin = time.perf_counter()
        step(loss_of, y, tensors)
        seconds.append(time.perf_counter() - begin)
    if parallel:
        dist.destroy_process_group()
    return {"method": method, "world": world, "rank": rank, "tokens": tokens, "dim": dim, "vocab": vocab,
            "classes": stop - start, "loss": value, "seconds": statistics.median(seconds) if seconds else None,
            "all_seconds": seconds, "peak_extra_bytes": max(peak, 0), "collectives": calls, "payload_bytes": sent,
            "payload_bytes_per_token": sent / tokens}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_configuration(method, world, args, repeats, env=None):
    """Every rank's row of `method` on `world` fresh processes (1 for a one-process method); env: more variables."""
    port = free_port()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    cmd = [sys.executable, "-m", "benchmarks.vocab_parallel_benchmark", "--tokens", str(args.tokens), "--dim",
           str(args.dim), "--repeats", str(repeats), "--worker", method, str(world), "RANK", port, str(args.vocab)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    procs = [subprocess.Popen([str(rank) if a == "RANK" else a for a in cmd], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=root, env=env) for rank in range(world)]
    rows = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=args.timeout)
            if proc.returncode != 0:
                raise SystemExit(f"benchmark worker {method} TP={world} V={args.vocab} failed:\n{err[-2000:]}")
            rows.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return rows


def measure(method, world, args, base=None):
    """One table row: the timed run (the slowest rank's median time, the largest rank's peak with glibc's default
    malloc, rank 0's collectives: every rank all-reduces the same sizes) and the live-buffer run (the largest
    rank's peak with LIVE_BUFFERS), and their ratios to `base`, the one-process row (None: this is it)."""
    timed = run_configuration(method, world, args, args.repeats)
    live = run_configuration(method, world, args, 0, LIVE_BUFFERS)
    row = {**timed[0], "seconds": max(r["seconds"] for r in timed), "ranks": timed, "live_ranks": live,
           "peak_extra_bytes": max(r["peak_extra_bytes"] for r in timed),
           "peak_live_bytes": max(r["peak_extra_bytes"] for r in live)}
    base = base or row
    return {**row, "time_ratio": row["seconds"] / base["seconds"],
            "memory_ratio": row["peak_extra_bytes"] / max(base["peak_extra_bytes"], 1),
            "live_memory_ratio": row["peak_live_bytes"] / max(base["peak_live_bytes"], 1),
            "memory_goal": 1.0 / world, "loss_difference": abs(row["loss"] - base["loss"])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[128256])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="process-group sizes (TP)")
    parser.add_argument("--kinds", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the first (their median)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--worker", nargs=5, metavar=("METHOD", "WORLD", "RANK", "PORT", "VOCAB"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        method, world, rank, port, vocab = args.worker
        print(json.dumps(worker(method, int(world), int(rank), port, args.tokens, args.dim, int(vocab),
                                args.repeats)))
        return

    from benchmarks.loss_benchmark import describe_machine

    cores = len(os.sched_getaffinity(0))
    print(f"CPU: {describe_machine('cpu', 1)}; gloo process groups, 1 thread per process")
    print(f"forward+backward, float32, N {args.tokens}, D {args.dim} (linear); time: the median of {args.repeats} "
          f"steps after a first; peak: above the inputs, glibc's default malloc / live buffers (mmap threshold fixed)")
    if max(args.worlds) > cores:
        print(f"note: {max(args.worlds)} processes on {cores} cores are oversubscribed: their times share cores")
    print(f"{'vocab':>7} {'method':<28} {'TP':>3} {'time s':>7} {'x 1-proc':>8} {'peak MiB':>8} {'x 1-proc':>8} "
          f"{'live MiB':>8} {'x 1-proc':>8} {'goal':>5} {'colls':>5} {'bytes/token':>11}")
    table = []
    for vocab in args.vocabs:
        args.vocab = vocab
        for kind in args.kinds:
            single, sharded = METHODS[kind]
            base = measure(single, 1, args)
            configurations = [(base, "-")] + [(measure(sharded, world, args, base), world) for world in args.worlds]
            for row, world in configurations:
                table.append(row)
                goal = "-" if world == "-" else f"{1 / world:.2f}"
                print(f"{vocab:>7} {LABELS[row['method']]:<28} {world:>3} {row['seconds']:>7.2f} "
                      f"{row['time_ratio']:>8.2f} {row['peak_extra_bytes'] / 2**20:>8.1f} {row['memory_ratio']:>8.2f} "
                      f"{row['peak_live_bytes'] / 2**20:>8.1f} {row['live_memory_ratio']:>8.2f} {goal:>5} "
                      f"{row['collectives']:>5} {row['payload_bytes_per_token']:>11.1f}", flush=True)
            worst = max(abs(r["loss_difference"]) / max(abs(base["loss"]), 1e-12) for r, _ in configurations)
            print(f"{'':>7} losses agree with the one-process loss to {worst:.1e} (relative)", flush=True)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"machine": describe_machine("cpu", 1), "cores": cores, "tokens": args.tokens, "dim": args.dim,
                       "repeats": args.repeats, "live_buffers_env": LIVE_BUFFERS, "rows": table}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
