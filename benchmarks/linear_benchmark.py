"""An output projection + loss, forward and backward, from features (N, D) and a weight (V, D):

    el_logits        encouraging_loss(F.linear(x, W), y)           logits-in EL (native / Triton), full (N, V) logits
    el_linear        encouraging_linear_loss(x, W, y)              the fused linear EL (el_fairseq.loss.linear)
    torch_ce         F.cross_entropy(F.linear(x, W), y)            torch, full logits
    torch_linear_ce  F.linear_cross_entropy(x, W, y, options=nn.LinearCrossEntropyOptions())   torch's chunked CE

    python -m benchmarks.linear_benchmark [--tokens 2048] [--dim 256] [--vocabs 32000] [--threads 1]
                                          [--methods ...] [--device cpu|cuda] [--dtypes float32 ...] [--json OUT]
    python -m benchmarks.linear_benchmark --large      # N 8,192, D 1,024, V 32,000 and 128,256 (slow)

EL rows use the defaults (log bonus, LE 0.75, no smoothing); CE rows no label smoothing (torch's chunked
path refuses it and falls back to full logits). 5% of the targets are ignored (-100). Each (method, V)
runs in a fresh process: peak = RSS high-water mark minus the RSS once x, W and y exist (so it counts
the gradients of x and W, which every method produces); on CUDA, torch.cuda.max_memory_allocated above
the allocation once they exist. Time: one forward+backward after a first one (the first also loads the
kernel and runs its self-check). Default: CPU, float32; --device cuda --dtypes float32 float16 bfloat16
gives the GPU rows (Triton per chunk).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = ("el_logits", "el_linear", "torch_ce", "torch_linear_ce")
LABELS = {"el_logits": "EL, logits in (native)", "el_linear": "EL, fused linear", "torch_ce": "torch linear + CE",
          "torch_linear_ce": "torch linear_cross_entropy"}
LARGE = {"tokens": 8192, "dim": 1024, "vocabs": [32000, 128256]}


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(method, tokens, dim, vocab, threads, device="cpu", dtype="float32"):
    import torch
    import torch.nn.functional as F

    from el_fairseq import encouraging_linear_loss, encouraging_loss

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    # Filled in place: a temporary would raise the RSS high-water mark before `base` is read.
    x = torch.empty(tokens, dim, device=device, dtype=dtype).normal_(generator=g).requires_grad_(True)
    w = torch.empty(vocab, dim, device=device, dtype=dtype).normal_(std=dim ** -0.5, generator=g).requires_grad_(True)
    y = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    y[-tokens // 20:] = -100
    losses = {  # "auto": the native kernel for float32 CPU logits, Triton for CUDA ones
        "el_logits": lambda: encouraging_loss(F.linear(x, w), y, impl="auto"),
        "el_linear": lambda: encouraging_linear_loss(x, w, y),
        "torch_ce": lambda: F.cross_entropy(F.linear(x, w), y),
        "torch_linear_ce": lambda: F.linear_cross_entropy(x, w, y, ignore_index=-100,
                                                           options=torch.nn.LinearCrossEntropyOptions()),
    }

    def step():
        x.grad = w.grad = None
        loss = losses[method]()
        loss.backward()
        return float(loss)  # on CUDA this waits for the step

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        value = step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        # torch imports its compiler (torch._dynamo, ~140 MiB of RSS, once per process) at the first call of any
        # torch.library custom op, as the losses' kernels are since issue 26: imported before the baseline, so
        # that the peak is the step's memory, not that import.
        import torch._dynamo  # noqa: F401
        base = _rss_bytes()
        value = step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return {"method": method, "tokens": tokens, "dim": dim, "vocab": vocab, "threads": threads, "device": device,
            "dtype": str(dtype).replace("torch.", ""), "loss": value, "seconds": seconds,
            "peak_extra_bytes": max(peak, 0)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000])
    parser.add_argument("--large", action="store_true", help="N 8,192, D 1,024, V 32,000 and 128,256")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float16", "bfloat16"], default=["float32"],
                        help="of x and W; the fused EL computes each chunk in float32")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "VOCAB", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.large:
        args.tokens, args.dim, args.vocabs = LARGE["tokens"], LARGE["dim"], LARGE["vocabs"]
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.tokens, args.dim, int(args.worker[1]), args.threads, args.device,
                                args.worker[2])))
        return

    from benchmarks.loss_benchmark import describe_machine

    print(f"{args.device.upper()}: {describe_machine(args.device, args.threads)}")
    print(f"projection + loss, forward+backward, N {args.tokens}, D {args.dim}; one run after a first")
    print(f"{'dtype':>8} {'vocab':>7} {'method':<27} {'time s':>8} {'x EL logits':>11} {'peak MiB':>9} "
          f"{'x EL logits':>11}")
    rows = []
    for dtype, vocab in [(d, v) for d in args.dtypes for v in args.vocabs]:
        base = None
        for method in args.methods:
            cmd = [sys.executable, "-m", "benchmarks.linear_benchmark", "--worker", method, str(vocab), dtype,
                   "--tokens", str(args.tokens), "--dim", str(args.dim), "--threads", str(args.threads),
                   "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(
                args.threads)}, cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
            if out.returncode != 0:
                raise SystemExit(f"benchmark worker {method} V={vocab} failed:\n{out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            base = base or row  # ratios against the first method run (el_logits by default)
            row["time_ratio"] = row["seconds"] / base["seconds"]
            row["memory_ratio"] = row["peak_extra_bytes"] / max(base["peak_extra_bytes"], 1)
            rows.append(row)
            label = LABELS[method]
            if method == "el_logits":  # what "auto" ran
                label = label.replace("native", "Triton" if args.device == "cuda" else
                                      "native" if dtype == "float32" else "chunked")
            print(f"{dtype:>8} {vocab:>7} {label:<27} {row['seconds']:>8.2f} {row['time_ratio']:>11.2f} "
                  f"{row['peak_extra_bytes'] / 2**20:>9.1f} {row['memory_ratio']:>11.2f}", flush=True)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"machine": describe_machine(args.device, args.threads), "rows": rows}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
