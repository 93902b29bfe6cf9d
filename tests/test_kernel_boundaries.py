"""No tensor a user hands the loss reaches a kernel that cannot read it (issue 25): 16-bit, autocast,
non-contiguous, mis-sized, one-class, meta, sparse and DTensor inputs, through every entry point and every
impl, and handed to each kernel directly. Each group runs in a child process (kernel_boundary_child.py),
so that a crash (the native kernel reading a DTensor's null data_ptr, or a bfloat16 buffer as float32)
fails the test instead of ending pytest; every case must return the float64 reference's value or refuse
in one line, as listed here."""
import importlib.util
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TRITON = importlib.util.find_spec("triton") is not None or os.environ.get("EL_FAIRSEQ_REQUIRE_TRITON") == "1"

# case name suffix -> the refusal it must give (every other case must compute the right value)
LOGITS_REFUSED = {"short-target": "ValueError: target shape (12,) does not match input (13, 37)",
                  "float-target-rows": "ValueError: target of class indices must be an integer tensor"}
KERNEL_ACCEPTED = {"native-transposed", "chunked-float64", "chunked-bfloat16", "chunked-transposed",
                   "triton-bfloat16", "triton-transposed"}
LINEAR_REFUSED = {"short-target": "target shape (12,) does not match input (13, 8)"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_group(*args, triton=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if triton:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "kernel_boundary_child.py"), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    cases = dict(line[len("CASE "):].split(" ", 1) for line in proc.stdout.splitlines() if line.startswith("CASE "))
    assert proc.returncode == 0 and "all cases ran" in proc.stdout, (
        f"the child ended with {proc.returncode} after {list(cases)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return cases


def assert_outcomes(cases, refused):
    """refused: {suffix: text the refusal must contain}; every other case 'ok'."""
    for name, outcome in cases.items():
        expected = next((text for suffix, text in refused.items() if name.endswith(suffix)), None)
        if expected is None:
            assert outcome == "ok", f"{name}: {outcome}"
        else:
            assert outcome.startswith("refused") and expected in outcome, f"{name}: {outcome}"


@pytest.mark.parametrize("impl", ["auto", "native", "chunked", "reference", "triton"])
def test_logits_entry_takes_or_refuses_every_tensor(impl):
    if impl == "triton" and not TRITON:
        pytest.skip("triton is not installed")
    cases = run_group(impl, triton=impl == "triton")
    assert len(cases) == 12
    assert_outcomes(cases, LOGITS_REFUSED)


@pytest.mark.parametrize("impl", ["auto", "native", "chunked", "triton"])
def test_linear_entry_takes_or_refuses_every_tensor(impl):
    if impl == "triton" and not TRITON:
        pytest.skip("triton is not installed")
    cases = run_group(f"linear-{impl}", triton=impl == "triton")
    assert len(cases) == 8
    assert_outcomes(cases, LINEAR_REFUSED)


def test_each_kernel_refuses_what_it_cannot_read_in_one_line():
    cases = run_group("kernels", triton=TRITON)
    assert len(cases) == 9 * (3 if TRITON else 2) + 3
    for name, outcome in cases.items():
        if name in KERNEL_ACCEPTED:
            assert outcome == "ok", f"{name}: {outcome}"
        else:
            assert outcome.startswith("refused KernelInputError: the "), f"{name}: {outcome}"


def test_dtensor_logits_and_projection_go_to_plain_torch_or_are_refused():
    """A tensor-parallel head's DTensor logits (Shard on the classes) and a vocabulary-parallel projection:
    impl='auto' computes them (the logits with the vocabulary-parallel loss, the projection with the
    vocabulary-parallel linear loss: a Replicate loss, Replicate input and Shard(0) weight gradients), as
    impl='reference' does with plain torch ops; a fused impl refuses in one line.
    A plain target beside DTensor logits: the vocabulary-parallel loss takes it, as torch's loss_parallel()
    does; under impl='reference' it is torch's own refusal, as for F.cross_entropy outside loss_parallel()."""
    cases = run_group("dtensor", free_port())
    assert len(cases) == 12
    for name, outcome in cases.items():
        if name == "dtensor-logits-plain-target-reference":
            assert outcome.startswith("refused RuntimeError: aten.gather.default got mixed torch.Tensor and DTensor")
        elif name.endswith(("auto", "reference")):
            assert outcome == "ok", f"{name}: {outcome}"
        else:
            assert outcome.startswith("refused KernelInputError: impl "), f"{name}: {outcome}"
