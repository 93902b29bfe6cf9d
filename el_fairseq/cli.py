"""Console entry points.

el-fairseq-user-dir              print the plugin's --user-dir path
el-fairseq-train / -generate     fairseq-train / fairseq-generate with --user-dir already given
el-fairseq-average-checkpoints   average the last N epoch checkpoints of a run
"""
import argparse
import os
import sys


def user_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def print_user_dir():
    print(user_dir())


def _with_user_dir(argv):
    if any(a == "--user-dir" or a.startswith("--user-dir=") for a in argv):
        return argv
    return argv + ["--user-dir", user_dir()]


def train():
    from fairseq_cli.train import cli_main

    sys.argv = [sys.argv[0]] + _with_user_dir(sys.argv[1:])
    cli_main()


def generate():
    from fairseq_cli.generate import cli_main

    sys.argv = [sys.argv[0]] + _with_user_dir(sys.argv[1:])
    cli_main()


def average_checkpoints(argv=None):
    from .checkpoints import average_checkpoints as average, last_checkpoints, save_atomically

    parser = argparse.ArgumentParser(description="Average fairseq checkpoints (parameters only).")
    parser.add_argument("--inputs", nargs="+", required=True,
                        help="checkpoint files, or one folder with --num-epoch-checkpoints/--num-update-checkpoints")
    parser.add_argument("--output", required=True)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--num-epoch-checkpoints", type=int)
    group.add_argument("--num-update-checkpoints", type=int)
    args = parser.parse_args(argv)
    try:
        if args.num_epoch_checkpoints or args.num_update_checkpoints:
            if len(args.inputs) != 1:
                parser.error(f"with --num-*-checkpoints, --inputs is one folder, got {len(args.inputs)} paths")
            if not os.path.isdir(args.inputs[0]):
                parser.error(f"--inputs {args.inputs[0]}: no such folder")
            by = "epoch" if args.num_epoch_checkpoints else "update"
            paths = last_checkpoints(args.inputs[0], args.num_epoch_checkpoints or args.num_update_checkpoints, by)
        else:
            paths = args.inputs
        for path in paths:
            if not os.path.isfile(path):
                parser.error(f"--inputs: no such checkpoint {path}")
        save_atomically(average(paths), args.output)
    except ValueError as err:
        parser.error(str(err))
    print(f"averaged {len(paths)} checkpoints into {args.output}: " + " ".join(os.path.basename(p) for p in paths))
