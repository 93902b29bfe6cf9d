"""What each spawned --cpu training worker runs (el_fairseq.compat's launcher, `--cpu
--distributed-world-size N`): fairseq's distributed_main, then its gloo process group destroyed.

Why here, in the plugin package: the worker is a new process that unpickles this function, which
imports its module; importing el_fairseq.criterions loads the plugin (the criteria registered, compat
applied) as the parent had it. fairseq's own --user-dir import in the worker would skip el_fairseq,
imported already. Why destroy the group: left to interpreter shutdown, gloo's threads can outlive the
objects they use and abort a worker that has finished training (SIGABRT, "terminate called without an
active exception").
"""
import torch


def run(i, distributed_main, main, cfg, kwargs):
    try:
        distributed_main(i, main, cfg, kwargs)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
