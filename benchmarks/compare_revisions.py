"""The loss and linear benchmarks of two revisions side by side, in one run: does a change make the loss's
hot path slower?

    python -m benchmarks.compare_revisions --base REV [--rounds 2] [--repeats 3] [--json OUT]

`make bench`'s two benchmarks (loss_benchmark: training and validation steps through fairseq's criterion
interface, V = 10,000 and 32,000; linear_benchmark: projection + loss from features) run for the base
revision (a temporary `git worktree` of REV, removed at the end) and for this working tree, alternating
base, current, base, current, ... so that a machine whose load drifts during the run weighs on both sides
alike. Each side runs its own code (PYTHONPATH = its tree) with the same interpreter and arguments. Per row
(benchmark, implementation, vocabulary, mode) the table gives each side's best time over the rounds and
their ratio current / base: a ratio within the spread of the rounds is noise.
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def worktree(revision):
    """A detached checkout of `revision` in a temporary folder, removed afterwards."""
    folder = tempfile.mkdtemp(prefix="el_fairseq_base_")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-f", folder, revision], check=True,
                   capture_output=True, text=True)
    try:
        yield folder
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", folder], capture_output=True)


def run_benchmark(tree, module, args, out):
    """One benchmark module of the code in `tree`, rows written to `out`."""
    env = {**os.environ, "PYTHONPATH": tree}
    subprocess.run([sys.executable, "-m", module, *args, "--json", out], cwd=tree, env=env, check=True)
    with open(out) as f:
        return json.load(f)["rows"]


def row_key(module, row):
    name = row.get("impl") or row.get("method")
    return (module.split(".")[-1], name, row["vocab"], row.get("mode", "train"), row.get("dtype", "float32"))


def row_seconds(row):
    return row["median_s"] if "median_s" in row else row["seconds"]


def compare(base_tree, rounds, repeats, scratch):
    """{key: {"base": [seconds per round], "current": [...]}}, alternating the two sides."""
    plan = [("benchmarks.loss_benchmark", ["--repeats", str(repeats), "--threads", "1", "--modes", "train", "eval"]),
            ("benchmarks.linear_benchmark", ["--threads", "1"])]
    times = {}
    for r in range(rounds):
        for module, args in plan:
            for side, tree in (("base", base_tree), ("current", ROOT)):
                print(f"[compare] round {r + 1}/{rounds}: {module} on {side}", flush=True)
                out = os.path.join(scratch, f"{module}-{side}-{r}.json")
                for row in run_benchmark(tree, module, args, out):
                    times.setdefault(row_key(module, row), {"base": [], "current": []})[side].append(row_seconds(row))
    return times


def table(times):
    lines = ["| benchmark | implementation | vocab | mode | base s (best) | current s (best) | current / base | "
             "spread of base |", "|---|---|---|---|---|---|---|---|"]
    for key, sides in sorted(times.items()):
        base, current = min(sides["base"]), min(sides["current"])
        spread = max(sides["base"]) / base - 1.0
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:,} | {key[3]} | {base:.3f} | {current:.3f} | "
                     f"{current / base:.3f} | {spread:+.1%} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision to compare against (a commit, tag or branch)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="loss_benchmark's repeats per step")
    parser.add_argument("--json", help="also write the times per round here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        parser.error(f"--rounds {args.rounds} and --repeats {args.repeats}: allowed 1 or more each")
    base_commit = subprocess.run(["git", "-C", ROOT, "rev-parse", args.base], capture_output=True, text=True)
    if base_commit.returncode != 0:
        parser.error(f"--base {args.base!r} is not a revision of this repository")
    with worktree(args.base) as base_tree, tempfile.TemporaryDirectory() as scratch:
        times = compare(base_tree, args.rounds, args.repeats, scratch)
    print(table(times))
    if args.json:
        current = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        rows = [{"benchmark": k[0], "impl": k[1], "vocab": k[2], "mode": k[3], "dtype": k[4], **v}
                for k, v in sorted(times.items())]
        with open(args.json, "w") as f:
            json.dump({"command": "python -m benchmarks.compare_revisions " + " ".join(sys.argv[1:] if argv is None
                                                                                       else argv),
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "base": base_commit.stdout.strip(),
                       "current": current.strip(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
