"""The Triton kernel under Triton's CPU interpreter (requirements.txt installs triton on Linux x86_64;
CI sets EL_FAIRSEQ_REQUIRE_TRITON=1 so that a missing triton fails instead of skipping). On a GPU,
test_loss.py's CUDA test runs the kernel itself."""
import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None and os.environ.get("EL_FAIRSEQ_REQUIRE_TRITON") != "1",
                    reason="triton is not installed")
def test_triton_kernel_under_the_interpreter_matches_float64():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_interpreter_check.py")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "triton interpreter checks passed" in proc.stdout
