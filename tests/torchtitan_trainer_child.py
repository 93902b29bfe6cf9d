"""One rank of torchtitan's Trainer on the CPU, run by test_torchtitan.py: argv world rank port, the folder in
$TORCHTITAN_TRAINER_DIR. Each run of PLAN[world] trains torchtitan's llama3 debug model (its `llama3_debugmodel`
config: 6 layers, dim 256, vocabulary 2048, ChunkedLossWrapper of 8 chunks) for STEPS steps on a tiny corpus and
tokenizer written into the folder, with the loss the run names (RUNS), tensor parallel over the `world` ranks under
an SPMD backend (loss parallel: each rank's logits hold its vocabulary shard), from the parameters of the first
one-process run (start.pt). It prints one line per run, "RUN <backend> <name> <json>": the logged loss and gradient
norm of each step and the number of vocabulary-parallel forwards; rank 0 saves the trained parameters (full
tensors) to <name>-<backend>-<world>.pt.

torchtitan 0.3.0's Trainer does not run on a CPU as it is; four stand-ins, none of them in the loss path:
- it takes "cuda" as the device type where no accelerator is found: torch's lookup answers "cpu" here;
- its metrics read device memory statistics, which torch.cpu lacks: a few functions return empty ones;
- its debug model attends with compiled FlexAttention, which has no CPU backward (and sdpa is refused for
  language models): the FlexAttention call runs torch's scaled_dot_product_attention with the dense mask of the
  same BlockMask (create_mask of its mask_mod: the same attention);
- after the first step it calls torch.distributed.set_timeout, which torch 2.13 names _set_pg_timeout.
"""
import datetime
import json
import os
import random
import sys
import types

import torch
import torch._utils
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.attention.flex_attention import AuxOutput, create_mask

torch._utils._get_available_device_type = lambda: "cpu"  # before torchtitan reads it at import
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vocab_parallel_child import end_finished, watch_parent  # noqa: E402

from el_fairseq.parallel import dtensor, vocab_parallel  # noqa: E402
from el_fairseq.torchtitan import EncouragingLoss  # noqa: E402
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss  # noqa: E402
from torchtitan.components.optimizer import default_adamw  # noqa: E402
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader  # noqa: E402
from torchtitan.models.common.attention import FlexAttention  # noqa: E402
from torchtitan.models.llama3.config_registry import llama3_debugmodel  # noqa: E402

STEPS, SEQ_LEN, BATCH, VOCAB = 3, 32, 4, 2048
EL = {"log_end": 0.5, "bonus_rho": 1.0, "bonus_label_smoothing": 0.1, "label_smoothing": 0.1}
RUNS = {  # name: the loss config
    "ce": lambda: ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=VOCAB)),
    "el-off": lambda: ChunkedLossWrapper.Config(loss_fn=EncouragingLoss.Config(global_vocab_size=VOCAB,
                                                                               bonus_rho=0.0)),
    "el": lambda: ChunkedLossWrapper.Config(loss_fn=EncouragingLoss.Config(global_vocab_size=VOCAB, **EL)),
    "el-unchunked": lambda: EncouragingLoss.Config(global_vocab_size=VOCAB, **EL),
}
# world: (SPMD backend, runs); the one-process runs come first (their start is every run's). torchtitan's default
# backend, spmd_types, does not run tensor parallel here: torch 2.13's fully_shard refuses its plain parameters.
PLAN = {1: [("spmd_types", ("ce", "el-off", "el", "el-unchunked"))],
        2: [("partial_dtensor", ("el", "el-off")), ("full_dtensor", ("el",))]}


def cpu_stand_ins():
    """The stand-ins of the module docstring."""
    for name, value in (("get_device_name", lambda *a: "cpu"), ("memory_stats", lambda *a: {}),
                        ("get_device_properties", lambda *a: types.SimpleNamespace(total_memory=2 ** 34)),
                        ("reset_peak_memory_stats", lambda *a: None), ("empty_cache", lambda *a: None),
                        ("current_device", lambda: 0)):
        setattr(torch.cpu, name, value)
    dist.set_timeout = c10d._set_pg_timeout
    FlexAttention._compiled_flex_attn = staticmethod(dense_flex_attention)


def dense_flex_attention(q, k, v, *, score_mod, block_mask, scale, enable_gqa, return_aux, kernel_options):
    """flex_attention(q, k, v, block_mask=...) as SDPA with the BlockMask's dense mask (no score_mod, no lse:
    what the debug model asks for)."""
    assert score_mod is None and not return_aux.lse, "the debug model's attention only"
    mask = create_mask(block_mask.mask_mod, q.size(0), None, q.size(2), k.size(2), device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa), AuxOutput()


def write_assets(workdir):
    """A word-level tokenizer (with <s>, </s>) and a corpus of 200 short documents, the same on every rank."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = "the a cat dog sat on mat ran far and then slept in sun big small red".split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(200)]
    for sub in ("tokenizer", "data"):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer.save(os.path.join(workdir, "tokenizer", "tokenizer.json"))
    with open(os.path.join(workdir, "tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": True}, f)
    with open(os.path.join(workdir, "data", "train.json"), "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)


def config(workdir, world, backend, loss):
    """torchtitan's llama3_debugmodel config, shortened to STEPS steps of BATCH x SEQ_LEN tokens, on the workdir's
    corpus, AdamW as SGD, no checkpoint nor validation, seeded, tensor parallel over `world` ranks with SPMD `backend`,
    `loss`."""
    c = llama3_debugmodel()
    c.loss = loss
    c.hf_assets_path = os.path.join(workdir, "tokenizer")
    c.dataloader = HuggingFaceTextDataLoader.Config(dataset="c4_test", dataset_path=os.path.join(workdir, "data"))
    c.training.seq_len, c.training.local_batch_size, c.training.steps = SEQ_LEN, BATCH, STEPS
    c.training.disable_cuda_graphs = True
    c.parallelism.tensor_parallel_degree, c.parallelism.spmd_backend = world, backend
    c.checkpoint.enable = c.validator.enable = False
    # AdamW with eps = 1 steps by about lr x the gradient (its gradients are << 1), so the trained parameters
    # compare the gradients; with eps = 1e-8 its normalised step turns float32 rounding of near-zero gradients into
    # lr-sized differences
    c.optimizer = default_adamw(lr=0.5, eps=1.0, weight_decay=0.0)
    c.dump_folder = os.path.join(workdir, f"out-{world}")
    c.debug.seed = 0
    return c


def full_parameters(model):
    """name: the full value of each parameter (a DTensor gathered: every rank must call this)."""
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}


@torch.no_grad()
def same_start(model, path):
    """Every run starts from the parameters of the first one-process run, saved to `path`: torchtitan's
    initialisation draws other values once the parameters are sharded (tensor parallel)."""
    if not os.path.exists(path):
        assert dist.get_world_size() == 1, "the one-process runs come first"
        torch.save(full_parameters(model), path)
        return
    start = torch.load(path)
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            p.to_local().copy_(distribute_tensor(start[name], p.device_mesh, p.placements).to_local())
        else:
            p.copy_(start[name])


def train(workdir, world, rank, backend, name):
    """Train one run; its losses and gradient norms as logged by the trainer's metrics, and how many times the
    vocabulary-parallel loss (el_fairseq.parallel) ran."""
    trainer = config(workdir, world, backend, RUNS[name]()).build()
    same_start(trainer.model_parts[0], os.path.join(workdir, "start.pt"))
    logged = {"loss": [], "grad_norm": [], "vocab_parallel_calls": 0}
    log, sharded_loss = trainer.metrics_processor.log, vocab_parallel.sharded_loss

    def counted(*args):  # the vocabulary-parallel loss, which its function and the DTensor hook both call
        logged["vocab_parallel_calls"] += 1
        return sharded_loss(*args)

    def record(step, global_avg_loss, global_max_loss, grad_norm, **kwargs):
        logged["loss"].append(global_avg_loss)
        logged["grad_norm"].append(grad_norm)
        return log(step, global_avg_loss, global_max_loss, grad_norm, **kwargs)

    trainer.metrics_processor.log = record
    vocab_parallel.sharded_loss = dtensor.sharded_loss = counted
    try:
        trainer.train()
    finally:
        vocab_parallel.sharded_loss = dtensor.sharded_loss = sharded_loss
    trained = full_parameters(trainer.model_parts[0])
    if rank == 0:
        torch.save(trained, os.path.join(workdir, f"{name}-{backend}-{world}.pt"))
    trainer.close()
    return logged


def main():
    """Join the gloo group of argv (world rank port), run PLAN[world] in the folder $TORCHTITAN_TRAINER_DIR."""
    world, rank, port = (int(a) for a in sys.argv[1:4])
    workdir = os.environ["TORCHTITAN_TRAINER_DIR"]
    watch_parent()
    torch.set_num_threads(1)
    cpu_stand_ins()
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    if rank == 0:
        write_assets(workdir)
    dist.barrier()
    try:
        for backend, names in PLAN[world]:
            for name in names:
                print(f"RUN {backend} {name} {json.dumps(train(workdir, world, rank, backend, name))}", flush=True)
    finally:
        dist.destroy_process_group()
    print("all runs ended", flush=True)
    end_finished()


if __name__ == "__main__":
    main()
