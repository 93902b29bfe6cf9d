"""fuse_encouraging_loss under data-parallel and sharded engines (issue 27 item 4), on this machine's CPU: two
gloo ranks, each with half of every batch, end two SGD steps of a tiny Llama at the parameters of one process
trained on the whole batches, for DDP, FSDP2 (the layers and the root; the output projection sharded on its
own; tied embeddings with embed_tokens and lm_head in one group; the layout of accelerate's FSDP2 plugin,
untied and tied) and DeepSpeed ZeRO-3 (untied and tied). The fused forward computes the projection as the call
lm_head(hidden) (el_fairseq.hf.fused.head_loss_sum), so each engine's hooks materialise the weight and reduce
its gradient as for the model's own loss; reading lm_head.weight directly failed when the head was sharded on
its own ("aten.mm got mixed torch.Tensor and DTensor").

The ranks are processes spawned here (torch.multiprocessing, ending with this one); each family of engines
runs once, every case in turn, rank 0 saving each case's parameters. DeepSpeed builds its CPU communication op
the first time (about a minute on 2 cores; kept in ~/.cache/el_fairseq/torch_extensions, or $EL_FAIRSEQ_CACHE's)."""
import datetime
import functools
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

from test_hf import EL, batch, llama, max_difference
from test_vocab_parallel import free_port

from el_fairseq.hf import fuse_encouraging_loss
from el_fairseq.hf.loss import IGNORE_INDEX, shift_labels

WORLD, STEPS, LR = 2, 2, 0.5
LIMIT_S = {"torch": 240, "deepspeed": 480}  # the first DeepSpeed run builds its CPU op (about 60 s)
ZERO3 = {
    "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
    "gradient_clipping": 0.0,  # as the one-process SGD: no clipping
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition every parameter
    "zero_allow_untested_optimizer": True,  # torch's SGD
    "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
}


def tiny_llama(tied):
    """test_hf's tiny Llama (vocabulary 37, hidden 16, 2 layers), its embeddings tied or not, fused with EL (log_end
    0.5, both smoothings 0.1); the same parameters in every process."""
    config = llama().config
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    return fuse_encouraging_loss(transformers.LlamaForCausalLM(config), **EL).train()


def step_batch(step, rank, world):
    """Rows rank::world of the step's 8 examples (varied lengths, so the ranks count different numbers of
    labels), and num_items_in_batch: the labels counted over all 8, as Trainer counts them."""
    inputs, labels = batch("causal", n=8, seed=11 + step)
    rows = slice(rank, None, world)
    return {k: v[rows] for k, v in inputs.items()}, labels[rows], shift_labels(labels).ne(IGNORE_INDEX).sum()


def train(model, engine, rank=0, world=1):
    """STEPS optimizer steps of `model` under `engine` on this rank's rows; its full parameters after them."""
    module, update, parameters = engine(model)
    for step in range(STEPS):
        inputs, labels, count = step_batch(step, rank, world)
        loss = module(**inputs, labels=labels, num_items_in_batch=count).loss
        update(loss * world)  # the engines average the ranks' gradients: Trainer scales the loss alike
    return parameters()


def parameters_of(model):
    """A function returning copies of `model`'s parameters, full ones for DTensors (a collective)."""
    from torch.distributed.tensor import DTensor

    def parameters():
        return {k: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for k, p in model.named_parameters()}
    return parameters


def sgd(model):
    """One SGD update from a loss: backward, step, zero the gradients."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def update(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return update


def single(model):
    return model, sgd(model), parameters_of(model)


def ddp(model):
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model), sgd(model), parameters_of(model)


def fsdp2(model, groups):
    """fully_shard on each of groups(model) (a module, or a list sharded as one group), then on the root."""
    from torch.distributed.fsdp import fully_shard

    for group in groups(model):
        fully_shard(group)
    fully_shard(model)
    return model, sgd(model), parameters_of(model)


def layers(model):
    return list(model.model.layers)


def accelerate_fsdp2(model):
    """The layout accelerate's FSDP2 plugin makes (transformer-based wrap): its own fsdp2_prepare_model, given
    what it reads of an Accelerator (whose FSDP needs GPUs): each decoder layer, the input embedding (untied),
    the final norm with lm_head (and the tied embedding) in one group kept unsharded after forward, the root."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True, cpu_ram_efficient_loading=False)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                  mixed_precision="no", is_main_process=dist.get_rank() == 0,
                                  device=torch.device("cpu"), parallelism_config=None)
    model = fsdp2_prepare_model(accelerator, model)
    head_group = model.lm_head._get_fsdp_state()
    assert head_group is model.model.norm._get_fsdp_state() and head_group is not model._get_fsdp_state()
    assert (head_group is model.model.embed_tokens._get_fsdp_state()) == model.config.tie_word_embeddings
    return model, sgd(model), parameters_of(model)


def zero3(model):
    """DeepSpeed ZeRO-3 (every parameter partitioned) with torch's SGD; the parameters gathered at the end."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=ZERO3)

    def update(loss):
        engine.backward(loss)
        engine.step()

    def parameters():
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return parameters_of(model)()
    return engine, update, parameters


CASES = {  # name: (tied embeddings, engine, family of engines run by the same ranks)
    "ddp": (False, ddp, "torch"),
    "fsdp2-layers-root": (False, functools.partial(fsdp2, groups=layers), "torch"),
    "fsdp2-lm-head-alone": (False, functools.partial(fsdp2, groups=lambda m: [*layers(m), m.lm_head]), "torch"),
    "fsdp2-tied-one-group": (True, functools.partial(
        fsdp2, groups=lambda m: [*layers(m), [m.model.embed_tokens, m.lm_head]]), "torch"),
    "fsdp2-accelerate": (False, accelerate_fsdp2, "torch"),
    "fsdp2-accelerate-tied": (True, accelerate_fsdp2, "torch"),
    "zero3": (False, zero3, "deepspeed"),
    "zero3-tied": (True, zero3, "deepspeed"),
}


def deepspeed_environment():
    """DeepSpeed on the CPU, its just-in-time ops built once into a cache that outlives the test."""
    from el_fairseq.loss.native import cache_dir

    cache = cache_dir() or os.path.join(os.path.expanduser("~"), ".cache", "el_fairseq")
    return {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": os.path.join(cache, "torch_extensions")}


def run_case(name, rank):
    """The case's parameters after training on this rank, or its error in a line (every rank raises alike)."""
    tied, engine, _ = CASES[name]
    try:
        return train(tiny_llama(tied), engine, rank, WORLD)
    except Exception as error:  # noqa: BLE001 - the case's test reports it; the next case still runs
        return f"{type(error).__name__}: {error}"


def rank_main(rank, family, port, out_dir):
    """One of WORLD ranks (a spawned process; its environment is its own): every case of `family` in turn."""
    from vocab_parallel_child import end_finished, watch_parent

    watch_parent()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    if family == "deepspeed":
        os.environ.update(deepspeed_environment())
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=90))
    try:
        for name, (_, _, of) in CASES.items():
            if of == family:
                result = run_case(name, rank)
                if rank == 0:
                    torch.save(result, os.path.join(out_dir, f"{name}.pt"))
    finally:
        dist.destroy_process_group()
    end_finished()  # a finished rank ends without interpreter shutdown, where gloo's threads could abort it


def spawn_ranks(family, out_dir):
    """Run the family's WORLD ranks to their end; killed and failed past LIMIT_S."""
    context = mp.start_processes(rank_main, args=(family, free_port(), out_dir), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + LIMIT_S[family]
    try:
        while not context.join(timeout=2):
            assert time.monotonic() < deadline, f"the {family} ranks were still running after {LIMIT_S[family]} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


@pytest.fixture(scope="module")
def trained_on_ranks(tmp_path_factory):
    """name -> the case's parameters after training on WORLD ranks (or its error); each family runs once."""
    results = {}

    def get(name):
        family = CASES[name][2]
        if name not in results:
            out = tmp_path_factory.mktemp(family)
            spawn_ranks(family, str(out))
            results.update({n: torch.load(out / f"{n}.pt") for n, case in CASES.items() if case[2] == family})
        return results[name]
    return get


@functools.lru_cache(maxsize=None)
def one_process(tied):
    """(initial, trained) parameters of one process on the whole batches."""
    model = tiny_llama(tied)
    initial = parameters_of(model)()
    return initial, train(model, single)


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_end_at_the_parameters_of_one_process(name, trained_on_ranks):
    got = trained_on_ranks(name)
    assert not isinstance(got, str), f"{name} on {WORLD} ranks raised {got[:600]}"
    initial, expected = one_process(CASES[name][0])
    assert set(got) == set(expected)
    assert max_difference(expected, initial) > 1e-2  # it trained
    assert max_difference(got, expected) < 1e-6, max_difference(got, expected)


def test_the_heads_hooks_run_around_the_fused_loss():
    """The fused loss is computed as lm_head(hidden): the head's forward pre-hook sees the hidden states, its
    forward hook the loss, and the head is its own again afterwards."""
    model = tiny_llama(False)
    seen = []
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(("pre", tuple(args[0].shape))))
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(("post", tuple(out.shape))))
    inputs, labels, count = step_batch(0, 0, 1)
    out = model(**inputs, labels=labels, num_items_in_batch=count)
    assert out.logits is None and seen == [("pre", (8 * 9, 16)), ("post", ())]  # (tokens, hidden); the loss
    assert "forward" not in vars(model.lm_head)
    assert torch.allclose(model.lm_head(torch.ones(2, 16)), model.lm_head.weight.sum(1).expand(2, -1), atol=1e-6)


def test_accelerate_hooks_on_the_head_still_run():
    """accelerate's hooks (device maps, offload) wrap the head's forward and call its `_old_forward`: that one
    is replaced for the call, so the hook's pre_forward still runs, and it is restored after."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    calls = []

    class Recorder(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(tuple(args[0].shape))
            return args, kwargs

    model, plain = tiny_llama(False), tiny_llama(False)
    add_hook_to_module(model.lm_head, Recorder())
    own = model.lm_head._old_forward
    inputs, labels, count = step_batch(1, 0, 1)
    loss = model(**inputs, labels=labels, num_items_in_batch=count).loss
    assert calls == [(8 * 9, 16)] and model.lm_head._old_forward is own
    assert torch.equal(loss, plain(**inputs, labels=labels, num_items_in_batch=count).loss)


def test_a_head_wrapped_after_fusing_is_refused_in_one_line():
    """A module wrapping the head after fusing (what FSDP1 makes of a unit, unsharding in its own forward) would
    be bypassed by the fused forward: refused in training, in one line; evaluation keeps the model's forward."""
    model = tiny_llama(False)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    inputs, labels, count = step_batch(0, 0, 1)
    with pytest.raises(ValueError) as err:
        model(**inputs, labels=labels, num_items_in_batch=count)
    assert "output embedding is Sequential, not a torch.nn.Linear" in str(err.value) and "\n" not in str(err.value)
    assert model.eval()(**inputs, labels=labels).logits.shape == (8, 9, 37)
