"""Multi-worker contract on CPU (gloo): two workers, half a batch each, gradients all-reduced and
logging outputs summed (logging_outputs_can_be_summed), equal the whole batch in one process.
fairseq's own launcher needs CUDA devices, so torch.distributed is driven directly."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fairseq_fixtures import TinyModel, build, make_sample

VOCAB = 40
KEYS = ("loss", "nll_loss", "ntokens", "nsentences", "sample_size",
        "energy_sum", "margin_sum", "p_y_sum", "well_classified", "diag_tokens")


def half(sample, rank):
    rows = slice(0, 3) if rank == 0 else slice(3, 6)
    target = sample["target"][rows]
    return {"net_input": {"src_tokens": sample["net_input"]["src_tokens"][rows]}, "target": target,
            "ntokens": int(target.ne(1).sum())}


def step(name, impl, sample):
    criterion = build(name, label_smoothing=0.1, el_impl=impl)
    model = TinyModel(VOCAB)
    loss, _, log = criterion(model, sample)
    loss.backward()
    assert type(criterion).logging_outputs_can_be_summed()
    return model.table.grad, torch.tensor([float(log[k]) for k in KEYS], dtype=torch.float64)


def worker(rank, port, name, impl, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        grad, logs = step(name, impl, half(make_sample(6, 8, VOCAB, seed=5), rank))
        dist.all_reduce(grad)
        dist.all_reduce(logs)
        if rank == 0:
            torch.save({"grad": grad, "logs": logs}, out)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name,impl", [("encouraging_loss", "native"), ("encouraging_loss", "chunked"),
                                       ("encouraging_label_smoothed_cross_entropy", "reference")])
def test_two_gloo_workers_equal_one_process(tmp_path, name, impl):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(worker, args=(free_port(), name, impl, out), nprocs=2, join=True)
    got = torch.load(out)
    grad, logs = step(name, impl, make_sample(6, 8, VOCAB, seed=5))
    assert torch.allclose(got["grad"], grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got["logs"], logs, rtol=1e-5, atol=1e-4)  # energy_sum is ~0 here
