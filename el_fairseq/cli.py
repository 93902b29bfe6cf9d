"""Console entry points.

el-fairseq-user-dir              print the plugin's --user-dir path
el-fairseq-train / -generate     fairseq-train / fairseq-generate with --user-dir already given;
                                 el-fairseq-train --help also lists the criterion's options

The plugin half of the package; the pipeline's entry points live in el_fairseq.pipeline
(el-fairseq-average-checkpoints is el_fairseq.pipeline.checkpoints).
"""
import argparse
import importlib
import os
import sys

HELP_CRITERION = "encouraging_loss"


def user_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def print_user_dir():
    print(user_dir())


def _with_user_dir(argv):
    if any(a == "--user-dir" or a.startswith("--user-dir=") for a in argv):
        return argv
    return argv + ["--user-dir", user_dir()]


def _prog():
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "el-fairseq"


def _fairseq_cli_main(module):
    """fairseq_cli.<module>.cli_main, with the plugin loaded; fairseq missing: one line, exit status 2."""
    try:
        cli = importlib.import_module(f"fairseq_cli.{module}")
    except ImportError as err:
        if (err.name or "").split(".")[0] in ("fairseq", "fairseq_cli"):
            what = f"fairseq is not installed in this Python ({sys.executable})"
        else:
            what = f"fairseq could not be imported ({err})"
        sys.exit(f"{_prog()}: error: {what}: install it with `make install` (scripts/install.sh; see the README)")
    from . import criterions  # noqa: F401  (the plugin: el_fairseq is imported already, so --user-dir would skip it)

    return cli.cli_main


def _criterion_named(argv):
    for i, a in enumerate(argv):
        if a == "--criterion" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--criterion="):
            return a.split("=", 1)[1]
    return HELP_CRITERION


def criterion_help(name):
    """The options of fairseq criterion `name`, as argparse prints them. fairseq-train --help leaves them
    out: fairseq adds a criterion's options only after a first parse, and --help ends that parse (which
    has already refused an unknown --criterion)."""
    from fairseq.criterions import CRITERION_REGISTRY

    parser = argparse.ArgumentParser(usage=argparse.SUPPRESS, add_help=False, allow_abbrev=False)
    group = parser.add_argument_group(f"options of --criterion {name} (with --criterion X --help: those of X)")
    CRITERION_REGISTRY[name].add_args(group)
    return parser.format_help().strip("\n")


def train():
    argv = sys.argv[1:]
    cli_main = _fairseq_cli_main("train")
    sys.argv = [sys.argv[0]] + _with_user_dir(argv)
    if "-h" not in argv and "--help" not in argv:
        return cli_main()
    try:
        cli_main()
    except SystemExit as done:  # fairseq's help printed: the criterion's options follow
        if done.code not in (0, None):
            raise
        sys.stdout.write("\n" + criterion_help(_criterion_named(argv)) + "\n")
        raise


def generate():
    cli_main = _fairseq_cli_main("generate")
    sys.argv = [sys.argv[0]] + _with_user_dir(sys.argv[1:])
    cli_main()
