"""Console entry points.

el-fairseq-user-dir              print the plugin's --user-dir path
el-fairseq-train / -generate     fairseq-train / fairseq-generate with --user-dir already given

The plugin half of the package; the pipeline's entry points live in el_fairseq.pipeline
(el-fairseq-average-checkpoints is el_fairseq.pipeline.checkpoints).
"""
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
