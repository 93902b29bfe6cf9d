"""What each spawned --cpu training worker runs (el_fairseq.compat's launcher, `--cpu
--distributed-world-size N`): fairseq's distributed_main; then, once training has finished, the
worker's output flushed, its gloo process group destroyed and the process ended with status 0
without interpreter shutdown.

Why here, in the plugin package: the worker is a new process that unpickles this function, which
imports its module; importing el_fairseq.criterions loads the plugin (the criteria registered, compat
applied) as the parent had it. fairseq's own --user-dir import in the worker would skip el_fairseq,
imported already.

Why os._exit after a finished training: objects that still reference the gloo process group when
distributed_main returns (fairseq's DistributedDataParallel model and trainer, presumably) are destroyed
at interpreter shutdown in no set order, and gloo's threads can then abort the finished worker
(SIGABRT, "terminate called without an active exception"), which fails the whole run. Destroying the group alone did not prevent it. A
worker that raised keeps Python's normal exit, so torch.multiprocessing reports its traceback.
"""
import logging
import os
import sys

import torch


def run(i, distributed_main, main, cfg, kwargs):
    distributed_main(i, main, cfg, kwargs)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os._exit(0)
