"""`make gpu-check`: every GPU figure the docs lack, from one command on a machine with a CUDA GPU.

    python -m el_fairseq.pipeline.gpu_check [--raw-dir DIR | --data DATA_BIN] [--updates 300]
                                            [--out results/gpu-check] [FAIRSEQ FLAGS...]

Stages (each recorded, a failing one does not stop the next):
  1. environment  torch, CUDA and triton versions, the GPU's name and count;
  2. tests        the CUDA tests (`pytest -m cuda`): fused paths vs float64, Triton's first-use
                  self-check on the real kernel, fp16 gradients after fairseq's loss scale, no_grad;
                  on a GPU a skipped test counts as a failure;
  3. benchmark    benchmarks.loss_benchmark on the device: fairseq's LS-CE, the EL reference,
                  chunked and Triton paths; float32/float16/bfloat16 logits; 10k and 32k vocabularies;
  4. linear       benchmarks.linear_benchmark on the device: the fused linear EL (no logits) against
                  logits-in EL, torch's linear + CE and torch's chunked F.linear_cross_entropy, per dtype,
                  at N 8,192, D 1,024, V 32,000 and 128,256 by default;
  5. compile      benchmarks.compile_benchmark on the device: a small transformer LM's training step
                  (forward + backward, float32), eager against torch.compile (inductor), with CE and EL,
                  through logits and through the fused linear losses; N 8,192 (8 x 1,024), D 1,024,
                  4 layers, V 32,000 by default (on --device cpu only with --stages ... compile: make bench
                  gives the CPU rows);
  6. training     fairseq-train with the `multi30k` recipe (transformer_iwslt_de_en), CE and EL, fp16,
                  --updates each on Multi30k De-En (prepared from --raw-dir, default ../shared/data/multi30k),
                  no validation or checkpoints: training tokens/s and peak GPU memory.
Writes OUT/report.md and OUT/report.json (with the GPU's name), OUT/loss_benchmark.json,
OUT/linear_benchmark.json and OUT/compile_benchmark.json.

--device cpu runs the same stages on the CPU (compile only when --stages names it), for testing this
command where there is no GPU (the CUDA tests then skip); trailing fairseq flags go to both trainings
(the tests shrink the model).
"""
import argparse
import datetime
import json
import os
import re
import resource
import subprocess
import sys
import time

from ..cli import user_dir
from . import provenance
from .recipes import LOSS_FLAGS, quote, train_command

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_RAW = os.path.join(os.path.dirname(ROOT), "shared", "data", "multi30k")
STAGES = ("tests", "benchmark", "linear", "compile", "training")


def log(message):
    print(f"[gpu-check {datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def environment(device):
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device,
           "cpu": provenance.cpu_model(), "python": sys.version.split()[0]}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["gpu"] = env["gpus"][0]
    return env


def pytest_counts(text):
    """{'passed': N, 'failed': N, 'skipped': N, ...} from pytest's closing line."""
    lines = [line for line in text.splitlines() if re.search(r"\b(passed|failed|skipped|deselected|error)", line)]
    counts = {}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                                   lines[-1] if lines else ""):
        counts[word.rstrip("s") if word.startswith("error") else word] = int(number)
    return counts


def run_tests(device, out):
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rs", "-p", "no:cacheprovider", "tests"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    with open(os.path.join(out, "cuda_tests.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    counts = pytest_counts(proc.stdout)
    bad = counts.get("failed", 0) + counts.get("error", 0)
    # pytest exits 5 when every selected test skipped (no GPU): that is the expected CPU outcome only.
    ok = bad == 0 and proc.returncode in (0, 5) and (device == "cpu" or counts.get("skipped", 0) == 0)
    return {"command": quote(cmd), "counts": counts, "ok": ok, "returncode": proc.returncode}


def run_benchmark_module(module, out, args):
    """python -m benchmarks.MODULE ARGS --json OUT/MODULE.json; its output in OUT/MODULE.log."""
    path = os.path.join(out, f"{module}.json")
    cmd = [sys.executable, "-m", f"benchmarks.{module}", *args, "--json", path]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    with open(os.path.join(out, f"{module}.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"command": quote(cmd), "ok": False, "error": proc.stderr.strip().splitlines()[-1:]}
    with open(path) as f:
        rows = json.load(f)["rows"]
    return {"command": quote(cmd), "ok": True, "rows": rows}


def run_benchmark(device, out, vocabs, tokens, repeats, dtypes):
    return run_benchmark_module("loss_benchmark", out, [
        "--device", device, "--modes", "train", "eval", "--dtypes", *dtypes, "--vocabs", *map(str, vocabs),
        "--tokens", str(tokens), "--repeats", str(repeats)])


def run_linear_benchmark(device, out, vocabs, tokens, dim, dtypes):
    return run_benchmark_module("linear_benchmark", out, [
        "--device", device, "--dtypes", *dtypes, "--vocabs", *map(str, vocabs), "--tokens", str(tokens),
        "--dim", str(dim)])


def run_compile_benchmark(device, out, tokens, seq, dim, layers, vocab, rounds, backend):
    return run_benchmark_module("compile_benchmark", out, [
        "--device", device, "--tokens", str(tokens), "--seq", str(seq), "--dim", str(dim), "--layers", str(layers),
        "--vocab", str(vocab), "--rounds", str(rounds), "--backend", backend])


def prepare_data(raw_dir, out):
    data = os.path.join(out, "data", "data-bin", "multi30k.de-en")
    if os.path.isdir(data):
        return data
    if not os.path.isdir(raw_dir):
        raise SystemExit(f"gpu-check: error: --raw-dir {raw_dir}: no such folder (Multi30k train/val/test_2016_flickr "
                         ".de/.en .gz files); give --raw-dir or --data DATA_BIN")
    cmd = ["bash", os.path.join(ROOT, "data-prep", "prepare-multi30k.sh"), "--src", "de", "--raw-dir", raw_dir,
           "--dest", os.path.join(out, "data")]
    log("preparing Multi30k De-En: " + quote(cmd))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return data


def train_child(result_path, fairseq_args):
    """fairseq-train in this process (one worker), then its peak memory: CUDA's max_memory_allocated on
    a GPU, the process's RSS high-water mark on the CPU."""
    import logging

    import torch

    from fairseq_cli.train import cli_main

    # The plugin itself: fairseq skips a --user-dir whose package is imported already (this module's is),
    # so its criteria and compat patches are loaded here, as fairseq-train's --user-dir would.
    import el_fairseq.criterions  # noqa: F401

    # fairseq-train's own log format (its basicConfig is a no-op once importing the plugin has logged),
    # which the report parses: "... | train_inner | {json}".
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                        level=logging.INFO, stream=sys.stdout, force=True)
    sys.argv = ["fairseq-train", *fairseq_args]
    start = time.time()
    cli_main()
    cuda = torch.cuda.is_available() and "--cpu" not in fairseq_args
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(result_path, "w") as f:
        json.dump({"peak_bytes": peak, "peak_kind": "cuda max_memory_allocated" if cuda else "process max RSS",
                   "wall_s": time.time() - start}, f)


def run_training(device, out, data, updates, extra):
    runs = {}
    for loss in ("ce", "el"):
        save_dir = os.path.join(out, f"train_{loss}")
        args = train_command("multi30k", loss, 1, data, save_dir, n_gpus=1 if device == "cuda" else 0,
                             precision="fp16", user_dir=user_dir(),
                             # one GPU: fairseq would otherwise start a worker on every visible GPU
                             extra=["--distributed-world-size", "1",
                                    "--max-update", str(updates), "--max-epoch", "0", "--disable-validation",
                                    "--no-save", "--log-interval", str(max(1, min(50, updates // 4))), *extra])
        result = os.path.join(out, f"train_{loss}.json")
        cmd = [sys.executable, "-m", "el_fairseq.pipeline.gpu_check", "--train-child", result, "--", *args]
        log(f"training {loss.upper()} for {updates} updates")
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        text = proc.stdout + proc.stderr
        log_path = os.path.join(out, f"train_{loss}.log")
        with open(log_path, "w") as f:
            f.write(text)
        if proc.returncode != 0:
            runs[loss] = {"ok": False, "command": quote(["fairseq-train", *args]),
                          "error": text.strip().splitlines()[-1:] if text.strip() else []}
            continue
        with open(result) as f:
            measured = json.load(f)
        inner, epochs = provenance.log_records(log_path, "train_inner"), provenance.log_records(log_path, "train")
        last = epochs[-1] if epochs else {}
        runs[loss] = {
            "ok": True, "command": quote(["fairseq-train", *args]), "criterion": quote(LOSS_FLAGS[loss]),
            "updates": int(float(inner[-1]["num_updates"])) if inner else None,
            # fairseq's wps over the epoch includes start-up (and Triton's compilation); the last
            # logged interval is the steady state.
            "train_wps": float(last["train_wps"]) if "train_wps" in last else None,
            "steady_wps": float(inner[-1]["wps"]) if inner else None,
            "last_loss": float(inner[-1]["loss"]) if inner else None,
            "last_nll_loss": float(inner[-1]["nll_loss"]) if inner else None,
            **measured,
        }
    ok = all(r["ok"] for r in runs.values())
    if ok and runs["ce"]["steady_wps"] and runs["el"]["steady_wps"]:
        runs["el_over_ce_wps"] = runs["el"]["steady_wps"] / runs["ce"]["steady_wps"]
        runs["el_over_ce_peak"] = runs["el"]["peak_bytes"] / runs["ce"]["peak_bytes"]
    return {"ok": ok, "runs": runs}


def number(value, digits):
    return "n/a" if value is None else f"{value:.{digits}f}"


def benchmark_section(stage, title, header, row):
    """A report.md section for one benchmark stage: its command, then a table (or why it failed)."""
    if not stage:
        return []
    lines = [f"## {title}", "", f"`{stage['command']}`", ""]
    if stage["ok"]:
        lines += [header, "|" + "---|" * (header.count("|") - 1)] + [row(r) for r in stage["rows"]]
    else:
        lines.append(f"FAILED: {stage.get('error')}")
    return lines + [""]


def markdown(report):
    env = report["environment"]
    where = env.get("gpu") or env["cpu"]
    lines = [f"# gpu-check: {where}", "",
             f"{report['date']}, el-fairseq {report['el_fairseq']}, torch {env['torch']} (CUDA {env['cuda']}), "
             f"triton {env['triton']}, Python {env['python']}; device `{env['device']}`"
             + (f", GPUs: {', '.join(env['gpus'])}" if env.get("gpus") else "") + ".", ""]
    tests = report["stages"].get("tests")
    if tests:
        counts = ", ".join(f"{n} {w}" for w, n in tests["counts"].items()) or "no summary"
        lines += ["## CUDA tests", "", f"`{tests['command']}`: {counts} -> **{'ok' if tests['ok'] else 'FAILED'}**", ""]
    lines += benchmark_section(report["stages"].get("benchmark"), "Loss benchmark",
                               "| mode | dtype | vocab | implementation | time ms | x LS-CE | peak MiB | x LS-CE |",
                               lambda r: f"| {r['mode']} | {r['dtype']} | {r['vocab']} | {r['impl']} | "
                                         f"{r['median_s'] * 1e3:.2f} | {r['time_ratio']:.2f} | "
                                         f"{r['peak_extra_bytes'] / 2**20:.1f} | {r['memory_ratio']:.2f} |")
    lines += benchmark_section(report["stages"].get("linear"), "Output projection + loss (fused linear EL)",
                               "| dtype | vocab | method | time s | x EL logits | peak MiB | x EL logits |",
                               lambda r: f"| {r['dtype']} | {r['vocab']} | {r['method']} | {r['seconds']:.3f} | "
                                         f"{r['time_ratio']:.2f} | {r['peak_extra_bytes'] / 2**20:.1f} | "
                                         f"{r['memory_ratio']:.2f} |")
    lines += benchmark_section(report["stages"].get("compile"), "torch.compile: a small transformer's training step",
                               "| head | loss | mode | first s | time ms | x eager | x CE | graph breaks |",
                               lambda r: f"| {r['head']} | {r['loss'].upper()} | {r['mode']} | {r['first_s']:.1f} | "
                                         f"{r['median_s'] * 1e3:.2f} | {r['x_eager']:.2f} | {r['x_ce']:.2f} | "
                                         f"{r['graph_breaks']} |")
    training = report["stages"].get("training")
    if training:
        lines += ["## Training (fairseq-train, `multi30k` recipe, Multi30k De-En)", "",
                  "| loss | updates | tokens/s (last interval) | tokens/s (whole run) | peak memory MiB | last loss | wall s |",
                  "|---|---|---|---|---|---|---|"]
        for loss in ("ce", "el"):
            r = training["runs"].get(loss, {})
            if r.get("ok"):
                lines.append(f"| {loss.upper()} | {r['updates']} | {number(r['steady_wps'], 0)} | {number(r['train_wps'], 0)} | "
                             f"{r['peak_bytes'] / 2**20:.0f} ({r['peak_kind']}) | {number(r['last_loss'], 3)} | {r['wall_s']:.0f} |")
            else:
                lines.append(f"| {loss.upper()} | FAILED: {r.get('error')} | | | | | |")
        if "el_over_ce_wps" in training["runs"]:
            lines += ["", f"EL / CE: {training['runs']['el_over_ce_wps']:.3f}x the tokens/s, "
                          f"{training['runs']['el_over_ce_peak']:.3f}x the peak memory."]
        lines += ["", "Commands:", ""] + [f"- {loss.upper()}: `{training['runs'][loss]['command']}`"
                                          for loss in ("ce", "el") if loss in training["runs"]]
    return "\n".join(lines) + "\n"


def write_atomically(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--train-child"]:
        return train_child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--raw-dir", default=DEFAULT_RAW, help="Multi30k raw files (default: %(default)s)")
    parser.add_argument("--data", help="a prepared Multi30k De-En data-bin folder (skips data preparation)")
    parser.add_argument("--updates", type=int, default=300, help="training updates per loss (default 300)")
    parser.add_argument("--out", default=os.path.join("results", "gpu-check"))
    parser.add_argument("--stages", nargs="+", choices=STAGES,
                        help="default: all; on --device cpu all but compile (make bench gives its CPU rows)")
    parser.add_argument("--bench-vocabs", type=int, nargs="+", default=[10000, 32000])
    parser.add_argument("--bench-tokens", type=int, default=4096)
    parser.add_argument("--bench-repeats", type=int, default=20)
    parser.add_argument("--bench-dtypes", nargs="+", choices=["float32", "float16", "bfloat16"],
                        default=["float32", "float16", "bfloat16"])
    parser.add_argument("--linear-vocabs", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--linear-tokens", type=int, default=8192)
    parser.add_argument("--linear-dim", type=int, default=1024)
    parser.add_argument("--compile-tokens", type=int, default=8192)
    parser.add_argument("--compile-seq", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--compile-dim", type=int, default=1024)
    parser.add_argument("--compile-layers", type=int, default=4)
    parser.add_argument("--compile-vocab", type=int, default=32000)
    parser.add_argument("--compile-rounds", type=int, default=10)
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (default: %(default)s)")
    args, extra = parser.parse_known_args(argv)
    if args.updates < 1:
        parser.error(f"--updates {args.updates}: must be at least 1")
    if args.stages is None:
        args.stages = [s for s in STAGES if args.device == "cuda" or s != "compile"]

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"gpu-check: error: torch {torch.__version__} at {os.path.dirname(torch.__file__)} sees no CUDA "
                         "GPU (torch.cuda.is_available() is False): run it on a machine with an NVIDIA GPU and a CUDA "
                         "build of torch (`make gpu-check` keeps the machine's own torch)")
    os.makedirs(args.out, exist_ok=True)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "el_fairseq": provenance.git_revision(), "environment": environment(args.device), "stages": {}}
    log(f"device: {report['environment'].get('gpu') or report['environment']['cpu']}")
    if "tests" in args.stages:
        log("CUDA tests (pytest -m cuda)")
        report["stages"]["tests"] = run_tests(args.device, args.out)
    if "benchmark" in args.stages:
        log("loss benchmark")
        report["stages"]["benchmark"] = run_benchmark(args.device, args.out, args.bench_vocabs, args.bench_tokens,
                                                      args.bench_repeats, args.bench_dtypes)
    if "linear" in args.stages:
        log("linear benchmark (fused output projection + loss)")
        report["stages"]["linear"] = run_linear_benchmark(args.device, args.out, args.linear_vocabs, args.linear_tokens,
                                                          args.linear_dim, args.bench_dtypes)
    if "compile" in args.stages:
        log("compile benchmark (eager vs torch.compile, CE and EL)")
        report["stages"]["compile"] = run_compile_benchmark(args.device, args.out, args.compile_tokens,
                                                            args.compile_seq, args.compile_dim, args.compile_layers,
                                                            args.compile_vocab, args.compile_rounds,
                                                            args.compile_backend)
    if "training" in args.stages:
        data = args.data or prepare_data(args.raw_dir, args.out)
        report["stages"]["training"] = run_training(args.device, args.out, data, args.updates, extra)
    report["ok"] = all(stage["ok"] for stage in report["stages"].values())
    write_atomically(os.path.join(args.out, "report.json"), json.dumps(report, indent=1) + "\n")
    write_atomically(os.path.join(args.out, "report.md"), markdown(report))
    print(markdown(report))
    log(f"{'all stages ok' if report['ok'] else 'SOME STAGES FAILED'}: {os.path.join(args.out, 'report.md')}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
