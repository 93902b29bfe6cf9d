"""Multi-worker training on CPU (gloo), the code path of multi-GPU training.

1. The criterion's contract, driven through torch.distributed directly: two workers, half a batch
   each, gradients all-reduced and logging outputs summed (logging_outputs_can_be_summed), equal
   the whole batch in one process.
2. fairseq-train itself: `--cpu --distributed-world-size 2` (two gloo workers spawned by fairseq's
   launcher through el_fairseq.compat, sharded batches, DDP's gradient all-reduce, summed logs)
   equals one worker with `--update-freq 2` on the same data: the same batches make each update,
   so training and validation loss and diagnostics agree to the digits fairseq logs.
"""
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import run
from fairseq_fixtures import TinyModel, build, make_sample

from el_fairseq.cli import user_dir

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
    from vocab_parallel_child import end_finished

    end_finished()  # without interpreter shutdown, where gloo's threads aborted a finished rank once in CI (SIGABRT)


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


TINY = ["--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "64",
        "--decoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"]
LOGGED = ("loss", "nll_loss", "wpb", "bsz", "gnorm")
DIAGNOSTICS = ("margin", "energy", "p_y", "well_classified_pct")


def fairseq_train(data_bin, criterion, *workers):
    proc = run("fairseq-train", str(data_bin / "bin"), "--user-dir", user_dir(), *TINY, *criterion,
               "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt",
               "--warmup-updates", "10", "--max-tokens", "700", "--max-update", "8", "--dropout", "0",
               "--log-format", "json", "--log-interval", "1", "--cpu", "--seed", "3", "--no-save",
               "--num-workers", "0", *workers)
    log = proc.stdout + proc.stderr
    records = {"train_inner": [], "valid": []}
    for line in log.splitlines():
        for kind in records:
            if f"| {kind} | " in line:
                records[kind].append(json.loads(line.split(f"| {kind} | ", 1)[1]))
    return log, records


@pytest.mark.parametrize("criterion", [
    ["--criterion", "encouraging_loss", "--el-impl", "native", "--log-end", "0.75"],
    ["--criterion", "encouraging_loss", "--el-impl", "chunked", "--bonus-label-smoothing", "0.1"],
    ["--criterion", "label_smoothed_cross_entropy_with_diagnostics"],
], ids=["el-native", "el-chunked", "ls-ce"])
def test_fairseq_train_two_cpu_workers_equal_update_freq_2(data_bin, criterion):
    log2, two = fairseq_train(data_bin, criterion, "--distributed-world-size", "2")
    assert "distributed init (rank 0)" in log2 and "distributed init (rank 1)" in log2
    log1, one = fairseq_train(data_bin, criterion, "--update-freq", "2")
    assert "distributed init" not in log1
    assert len(one["train_inner"]) == len(two["train_inner"]) == 8 and len(one["valid"]) == len(two["valid"]) == 1
    keys = LOGGED + DIAGNOSTICS
    for a, b in zip(one["train_inner"], two["train_inner"]):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    valid_keys = [f"valid_{k}" for k in ("loss", "nll_loss", *DIAGNOSTICS)]
    assert {k: one["valid"][0][k] for k in valid_keys} == {k: two["valid"][0][k] for k in valid_keys}


def test_cpu_world_size_is_one_unless_given(monkeypatch):
    """fairseq's default --distributed-world-size is the CUDA device count: with --cpu that GPU default
    means one worker, an explicit world size (flag or hydra override) is kept."""
    from el_fairseq.compat import cpu_world_size

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert cpu_world_size(4, ["data", "--cpu"]) == 1
    assert cpu_world_size(4, ["data", "--cpu", "--distributed-world-size", "4"]) == 4
    assert cpu_world_size(4, ["data", "--cpu", "--distributed-world-size=4"]) == 4
    assert cpu_world_size(4, ["distributed_training.distributed_world_size=4"]) == 4
    assert cpu_world_size(2, ["data", "--cpu"]) == 2  # not fairseq's default: set by whoever built the config
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert cpu_world_size(1, []) == 1 and cpu_world_size(3, []) == 3


def test_fairseq_train_cpu_on_a_machine_with_gpus_trains_one_worker(data_bin, tmp_path):
    """fairseq-train --cpu where torch sees 4 GPUs (faked before fairseq computes its default world size)."""
    import os
    import subprocess
    import sys

    argv = ["fairseq-train", str(data_bin / "bin"), "--user-dir", user_dir(), *TINY, "--criterion", "encouraging_loss",
            "--optimizer", "adam", "--lr", "3e-3", "--max-tokens", "700", "--max-update", "2", "--cpu", "--no-save",
            "--num-workers", "0"]
    code = ("import sys, torch\ntorch.cuda.device_count = lambda: 4\n"
            f"sys.argv = {argv!r}\nfrom fairseq_cli.train import cli_main\ncli_main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "distributed_world_size': 1" in log and "distributed init" not in log and "done training" in log


def _spawn_target_check(i, store, fails):
    """Runs in a process of its own: a finished worker ends there with status 0 (os._exit), a failed
    one raises."""
    from el_fairseq.criterions.spawned_worker import run as spawned_worker

    def distributed_main(rank, main, cfg, kwargs):  # fairseq's: init the group, train
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=1)
        main(cfg, **kwargs)

    def main(cfg, steps):
        for _ in range(steps):
            t = torch.ones(3)
            dist.all_reduce(t)
        print("trained", flush=True)
        if fails:
            raise RuntimeError("training failed")

    spawned_worker(i, distributed_main, main, None, {"steps": 2})
    raise AssertionError("not reached: a finished worker ends in spawned_worker")


@pytest.mark.parametrize("fails", [False, True], ids=["finished", "raised"])
def test_a_spawned_cpu_worker_ends_without_interpreter_shutdown(tmp_path, fails):
    """el_fairseq's --cpu spawn target: after a finished training the worker ends with status 0 before
    interpreter shutdown (where gloo's threads could abort it with SIGABRT); a failure is reported."""
    if fails:
        with pytest.raises(mp.ProcessRaisedException, match="training failed"):
            mp.spawn(_spawn_target_check, args=(str(tmp_path / "store"), True), nprocs=1, join=True)
    else:
        mp.spawn(_spawn_target_check, args=(str(tmp_path / "store"), False), nprocs=1, join=True)
