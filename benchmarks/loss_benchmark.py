"""Time and peak memory through fairseq's criterion interface, fairseq's label_smoothed_cross_entropy
vs the encouraging loss (reference and fused paths): forward+backward (training) and the forward
alone under torch.no_grad (validation, where the fused paths compute no gradient).

    python -m benchmarks.loss_benchmark [--tokens 4096] [--vocabs 10000 32000] [--threads 1]
                                        [--repeats 7] [--device cpu|cuda] [--json OUT]

Each (implementation, vocabulary) runs in a fresh process, so peak memory is that run's alone.
CPU peak = the process's RSS high-water mark minus its RSS once the inputs exist (large tensors
are mmap'ed and returned to the OS when freed, so RSS follows the allocator); CUDA peak =
torch.cuda.max_memory_allocated minus the allocation before the step. Both count logits.grad,
which every criterion produces.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

IMPLS = {"cpu": ("ls_ce", "el_reference", "el_chunked", "el_native"),
         "cuda": ("ls_ce", "el_reference", "el_chunked", "el_triton")}
LABELS = {"ls_ce": "fairseq LS-CE", "el_reference": "EL reference", "el_chunked": "EL fused, torch ops",
          "el_native": "EL fused, native", "el_triton": "EL fused, Triton"}


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(impl, tokens, vocab, repeats, device, threads, mode="train", dtype="float32"):
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from fairseq_fixtures import PAD, build

    torch.set_num_threads(threads)
    name = "label_smoothed_cross_entropy" if impl == "ls_ce" else "encouraging_loss"
    kwargs = {"label_smoothing": 0.1}
    if impl != "ls_ce":
        kwargs["el_impl"] = impl.split("_", 1)[1]
    criterion = build(name, vocab=vocab, **kwargs)

    g = torch.Generator().manual_seed(0)
    # Filled in place: a temporary here would raise the RSS high-water mark before `base` is read
    # and hide up to one N x V tensor of the step's own peak.
    logits = torch.empty(1, tokens, vocab, dtype=getattr(torch, dtype)).normal_(generator=g).mul_(4)
    logits = logits.to(device).requires_grad_(True)
    target = torch.randint(4, vocab, (1, tokens), generator=g).to(device)
    target[0, -tokens // 20:] = PAD  # 5% padding, as in real batches

    class Model(torch.nn.Module):  # hands the fixed logits to the criterion
        decoder = type("D", (), {"adaptive_softmax": None})()

        def forward(self, src_tokens):
            return logits, None

        def get_targets(self, sample, net_output):
            return sample["target"]

        def get_normalized_probs(self, net_output, log_probs):
            return torch.log_softmax(net_output[0].float(), -1)

    model = Model()
    sample = {"net_input": {"src_tokens": target}, "target": target, "ntokens": int(target.ne(PAD).sum())}

    def step():
        logits.grad = None
        if mode == "train":
            loss, _, _ = criterion(model, sample)
            loss.backward()
        else:
            with torch.no_grad():
                criterion(model, sample)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        # torch imports its compiler (torch._dynamo, ~140 MiB of RSS, once per process) at the first call of any
        # torch.library custom op, as the losses' kernels are since issue 26: imported before the baseline, so
        # that the peak is the step's memory, not that import.
        import torch._dynamo  # noqa: F401
        base = _rss_bytes()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"impl": impl, "vocab": vocab, "tokens": tokens, "device": device, "mode": mode, "dtype": dtype,
            "median_s": statistics.median(times), "peak_extra_bytes": max(peak, 0)}


def describe_machine(device, threads):
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} cores ({threads} thread(s) used), torch {torch.__version__}"
    if device == "cuda":
        desc += f", GPU {torch.cuda.get_device_name()}"
    return desc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[10000, 32000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all = CPU, and CUDA when present")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--modes", nargs="+", choices=["train", "eval"], default=["train", "eval"],
                        help="train = forward+backward; eval = forward under torch.no_grad")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float16", "bfloat16"], default=["float32"],
                        help="logits dtypes; 16-bit ones on the CPU run LS-CE and the chunked path (the native "
                             "kernel takes float32)")
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "VOCAB", "MODE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        device = "cpu" if args.device == "all" else args.device
        print(json.dumps(worker(args.worker[0], args.tokens, int(args.worker[1]), args.repeats, device, args.threads,
                                args.worker[2], args.worker[3])))
        return

    import torch

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    rows = []
    for device in devices:
        for dtype, mode in [(d, m) for d in args.dtypes for m in args.modes]:
            print(f"\n{device.upper()}: {describe_machine(device, args.threads)}")
            what = "forward+backward" if mode == "train" else "forward under torch.no_grad (validation)"
            print(f"{what} through the criterion, {args.tokens} target tokens, {dtype} logits, "
                  f"label smoothing 0.1, EL defaults (log bonus, LE 0.5, eps_b 0.1); median of {args.repeats}")
            print(f"{'vocab':>7} {'implementation':<20} {'time ms':>9} {'x LS-CE':>8} {'peak MiB':>9} {'x LS-CE':>8}")
            for vocab in args.vocabs:
                base = None
                impls = IMPLS[device] if dtype == "float32" or device == "cuda" else ("ls_ce", "el_chunked")
                for impl in impls:
                    cmd = [sys.executable, "-m", "benchmarks.loss_benchmark", "--worker", impl, str(vocab), mode, dtype,
                           "--tokens", str(args.tokens), "--repeats", str(args.repeats), "--threads", str(args.threads),
                           "--device", device]
                    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                    out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                         cwd=os.path.join(os.path.dirname(__file__), ".."))
                    if out.returncode != 0:
                        raise SystemExit(f"benchmark worker {impl} V={vocab} failed:\n{out.stderr[-2000:]}")
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                    base = base or row
                    row["time_ratio"] = row["median_s"] / base["median_s"]
                    row["memory_ratio"] = row["peak_extra_bytes"] / max(base["peak_extra_bytes"], 1)
                    rows.append(row)
                    print(f"{vocab:>7} {LABELS[impl]:<20} {row['median_s'] * 1e3:>9.1f} {row['time_ratio']:>8.2f} "
                          f"{row['peak_extra_bytes'] / 2**20:>9.1f} {row['memory_ratio']:>8.2f}", flush=True)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"machine": {d: describe_machine(d, args.threads) for d in devices}, "rows": rows}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
