"""The vocabulary-parallel linear loss (el_fairseq.parallel.vocab_parallel_linear, issue 27 item 3): gloo groups of 1
to 4 processes on this machine, each rank holding uneven rows of a projection of V = 101 classes (a one-row shard,
an empty one: vocab_parallel_child.LAYOUTS), N = 23 token rows, D = 8, run vocab_parallel_linear_child.py. On every
rank the loss, the input's gradient and the rank's slice of the weight and bias gradients equal the float64
reference `encouraging_loss(F.linear(x, W, b))` of the full projection (and `encouraging_linear_loss` in float32)
for every option set, reduction, float32/float64 and chunk sizes 5 and 7 (ragged: 5+5+5+5+3, 7+7+7+2) and the
default (one chunk); an ignored row, confident rows (1 - p_y ~ 1e-9) and a confidently wrong one.

Collectives, counted by wrapping torch.distributed's: forward 1 + 2k all-reduces for k chunks (1 + 3k with bonus
smoothing), also under torch.no_grad; backward 1 (the input gradient), 0 when the input does not require grad.
Bad inputs on one rank raise one line on every rank (none left waiting); a DTensor weight (and bias) Shard(0) with
a Replicate or plain input, through encouraging_linear_loss and a ColwiseParallel EncouragingLinearLoss, runs it
(a Replicate loss, Shard(0) weight gradient)."""
import pytest

from test_vocab_parallel import assert_every_case_ok, run_group

# values: 13 option sets x 3 reductions x 2 dtypes, then against encouraging_linear_loss, no bias, input without
# grad, weight-only grad, no_grad, (B, T, D) rows, nothing counted, a second backward; errors: 5 (+ 2 with more
# than one rank); DTensor: 3
CASES = 13 * 3 * 2 + 8 + 5 + 4
LIMIT_S = 60


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_rank_equals_the_one_process_linear_loss(world):
    assert_every_case_ok(run_group(world, "vocab_parallel_linear_child.py", LIMIT_S), CASES + 2 * (world > 1))
