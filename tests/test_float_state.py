"""Loading and running the native CPU kernel leaves the process's floating-point state alone.

gcc and clang link crtfastmath.o into a shared library built with -ffast-math on its link line; its
constructor sets flush-to-zero / denormals-are-zero for the whole process. A fresh interpreter is
used so that nothing earlier in the test session has loaded the kernel already.
"""
import os
import subprocess
import sys

import pytest

from el_fairseq.loss import native

SCRIPT = r"""
import numpy as np, torch
from el_fairseq import encouraging_loss
from el_fairseq.loss import native
assert native.available(), native.error()
before = float(torch.tensor(1e-39) * 1)
logits = torch.randn(37, 101, requires_grad=True)
target = torch.randint(0, 101, (37,))
encouraging_loss(logits, target, impl="native").backward()
print(before, float(torch.tensor(1e-39) * 1), float(np.float32(1e-39) * np.float32(1)))
"""


@pytest.mark.skipif(not native.available(), reason="no C compiler")
def test_a_denormal_survives_loading_and_running_the_native_kernel(tmp_path):
    env = dict(os.environ, EL_FAIRSEQ_CACHE=str(tmp_path))  # a build of this source, not a cached one
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    before, torch_after, numpy_after = map(float, out.stdout.split())
    assert before > 0
    assert torch_after > 0, "the kernel turned on flush-to-zero in torch"
    assert numpy_after > 0, "the kernel turned on flush-to-zero in numpy"
