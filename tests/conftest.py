import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess  # noqa: E402

import pytest  # noqa: E402

BIN = os.path.dirname(sys.executable)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; `make gpu-check` runs these (-m cuda)")


def run(tool, *args, cwd=None, check=True):
    """Run a console script of this environment (fairseq-*, el-fairseq-*)."""
    proc = subprocess.run([os.path.join(BIN, tool), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory):
    """The generated toy corpus, binarised by fairseq-preprocess: ROOT/bin."""
    from el_fairseq.pipeline.synthetic import binarize, write_corpus

    root = tmp_path_factory.mktemp("corpus")
    write_corpus(str(root / "raw"), sizes=(("train", 1500), ("valid", 100), ("test", 100)))
    binarize(str(root / "raw"), str(root / "bin"))
    return root


@pytest.fixture
def fresh_kernel_state():
    """No first-use self-check result and no fallback warning left over from another test."""
    from el_fairseq.loss import dispatch, self_check

    self_check.reset()
    dispatch._warned.clear()
    yield
    self_check.reset()
    dispatch._warned.clear()


@pytest.fixture
def fresh_dynamo():
    """For the tests that compile: each test compiles from nothing (dynamo's caches and its counters of graphs
    and breaks reset), and inductor builds in the test process, without a worker pool beside it (a 2-core CI
    machine). torch._dynamo is imported here, not at collection: only these tests pay its import."""
    from unittest import mock

    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with mock.patch.object(torch._inductor.config, "compile_threads", 1):
        yield
    torch._dynamo.reset()
