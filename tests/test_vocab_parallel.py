"""The vocabulary-parallel encouraging loss (el_fairseq.parallel, issue 27): gloo groups of 1 to 4 processes on
this machine, each rank holding an uneven shard of V = 101 classes (a one-class shard, an empty one), run
vocab_parallel_child.py. Every rank's loss and its shard's gradient equal `encouraging_loss(impl="reference")`
on the gathered logits in float64 (and torch_el_loss64, and F.cross_entropy with bonus_rho=0), for every
option, reduction and float32/float64; the forward runs 2 collectives (3 with bonus smoothing), the backward
none; bad inputs raise one line on every rank, with no rank left waiting; DTensor logits sharded on the
classes run it through `encouraging_loss` / `EncouragingLoss`."""
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# value cases: 13 option sets x 3 reductions x 2 dtypes, then torch_el_loss64, cross-entropy, bfloat16,
# nothing counted, class-last rows, backward twice; errors: 7 (+ the overlap with more than one rank); DTensor: 9
CASES = 13 * 3 * 2 + 6 + 7 + 9
LIMIT_S = 150


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_group(world, script="vocab_parallel_child.py", limit_s=LIMIT_S):
    """Start the `world` ranks of `script`, wait for all of them (killing every one past limit_s), return their
    outputs."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, script), str(world), str(rank), port],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in range(world)]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=limit_s)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


def assert_every_case_ok(outputs, cases):
    """Every rank ran `cases` cases, all "ok", and ended with "all cases ran"."""
    for rank, (code, out, err) in enumerate(outputs):
        lines = [line.split(" ", 3)[1:] for line in out.splitlines() if line.startswith("CASE ")]
        failed = [" ".join(line)[:300] for line in lines if line[2] != "ok"]
        assert code == 0 and "all cases ran" in out and not failed, (
            f"rank {rank} of {len(outputs)} ended with {code}; failed: {failed[:8]}\n{out[-1500:]}\n{err[-3000:]}")
        assert {int(r) for r, _, _ in lines} == {rank}
        assert len(lines) == cases, [name for _, name, _ in lines]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_rank_equals_the_loss_of_the_gathered_logits(world):
    assert_every_case_ok(run_group(world), CASES + (world > 1))
