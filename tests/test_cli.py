"""The console entry points: el-fairseq-train --help lists the criterion's options (fairseq-train's own
--help cannot: it ends the first parse, before criterion options exist), and without fairseq the
fairseq wrappers say so in one line."""
import os
import subprocess
import sys

import pytest

from conftest import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_help_lists_the_criterions_options():
    out = run("el-fairseq-train", "--help").stdout
    assert "--max-tokens" in out  # fairseq's own help first
    section = out.split("options of --criterion encouraging_loss", 1)[1]
    for flag in ("--label-smoothing", "--bonus {log,power,cosine}", "--log-end", "--bonus-rho", "--bonus-schedule",
                 "--el-impl", "--no-log-diagnostics"):
        assert flag in section, flag
    assert "--log-end" not in run("fairseq-train", "--help").stdout  # what the section is for


def test_train_help_follows_the_criterion_given():
    out = run("el-fairseq-train", "--criterion", "label_smoothed_cross_entropy_with_diagnostics", "--help").stdout
    section = out.split("options of --criterion label_smoothed_cross_entropy_with_diagnostics", 1)[1]
    assert "--label-smoothing" in section and "--log-end" not in section


@pytest.mark.parametrize("tool", ["train", "generate"])
def test_without_fairseq_one_line(tool):
    code = ("import sys\n"
            "sys.modules['fairseq'] = sys.modules['fairseq_cli'] = None  # as if not installed\n"
            f"sys.argv = ['el-fairseq-{tool}', 'DATA']\n"
            f"from el_fairseq.cli import {tool}\n{tool}()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"el-fairseq-{tool}: error: fairseq is not installed in this Python ({sys.executable}): "
                           "install it with `make install` (scripts/install.sh; see the README)\n")
