"""The encouraging loss of a causal LM without its logits: from the last hidden state h and the output
embedding W (logits = h W^T + b, as Llama-, Qwen-, Mistral- and GPT-2-style models compute them),

    loss = sum_{t: label_{t+1} != -100} EL(h_t W^T + b, label_{t+1}) / num_items_in_batch

through `encouraging_linear_loss`, which takes the projection chunk by chunk and never holds the
(tokens, vocabulary) logits or their gradient. Opt in per model, as with Liger's kernels:

    model = fuse_encouraging_loss(model, log_end=0.75)      # any option of encouraging_loss
    Trainer(model=model, args=args, train_dataset=train)     # no compute_loss_func: the model returns the loss

The model's forward is replaced on this instance only (not its class). Called with `labels` in training
mode it returns the loss and `logits=None`; in eval mode (Trainer's evaluation) it computes the logits
and the same loss from them (compute_loss_func's path), so evaluation and generation see the logits.
Without labels it is the model's own forward. The sum and its normaliser follow Trainer's rule
(el_fairseq.hf.loss); Trainer passes num_items_in_batch because the new forward accepts it.
Models whose logits are not a plain projection of the last hidden state are refused in one line:
logit soft-capping (Gemma 2/3), logit scaling (Cohere, Granite), a final logits bias, a padded vocabulary.

Several processes: the projection is the call `lm_head(hidden)` whose forward is, for that call, the fused
loss (head_loss_sum), so an engine's hooks on the head run as for the model's own logits. DDP all-reduces
the gradients; FSDP2 unshards the head's group in its pre-forward hook and reduce-scatters the weight's
gradient after the head's backward, whatever group holds it (the root's, its own, the final norm's as
accelerate's plugin makes it, the input embedding's when tied); DeepSpeed ZeRO-3 gathers the partitioned
weight in its hooks and reduce-scatters its gradient (tests/test_sharded_training.py). A head wrapped in a
module after fusing (FSDP1's FullyShardedDataParallel) is refused in one line: its wrapper unshards in its
forward, which the fused loss does not call.

A trainer that replaces the model's forward and calls its backbone itself (TRL's SFTTrainer adds its own fused
LM head, which computes NLL and keeps this forward only for calls without `fused_lm_head=True`) would train
with its loss, not EL: a forward pre-hook on the backbone refuses, in one line, a backbone call in training
with gradients that does not come from this forward (or from a caller that applies the encouraging loss
itself, inside `sanctioned_backbone_calls()`: el_fairseq.hf.trl.EncouragingSFTTrainer).
"""
import contextlib
import functools
import inspect
import threading
import types

import torch

from ..loss.linear import encouraging_linear_loss
from .loss import IGNORE_INDEX, check_el_options, normalise, shift_labels, trainer_loss

# config attributes that change the logits after the projection, with the value that leaves them alone
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": (None, "logit soft-capping"),
    "logit_softcapping": (None, "logit soft-capping"),
    "logits_scaling": (1.0, "logit scaling"),
    "logit_scale": (1.0, "logit scaling"),
    "unpadded_vocab_size": (None, "a padded vocabulary (logits cut to unpadded_vocab_size)"),
}
LOSS_ARGUMENTS = ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep")
_SANCTIONED = threading.local()  # depth of the calls that apply the encouraging loss, per thread


def refusal(model):
    """Why `model` cannot take the fused loss (None if it can)."""
    name = type(model).__name__
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model; the fused loss takes causal LMs: use compute_loss_func"
    configs = [config] + ([config.get_text_config()] if hasattr(config, "get_text_config") else [])
    for attr, (neutral, what) in LOGIT_TRANSFORMS.items():
        for c in configs:
            value = getattr(c, attr, neutral)
            if value != neutral:
                return (f"{name} has {what} (config.{attr}={value!r}), which the fused loss does not apply: "
                        f"use compute_loss_func(causal_lm=True)")
        value = getattr(model, attr, neutral)
        if not isinstance(value, (int, float, type(None))) or value != neutral:  # e.g. a learned logit_scale
            return f"{name} has {what} (model.{attr}), which the fused loss does not apply: use compute_loss_func"
    if getattr(model, "final_logits_bias", None) is not None:
        return f"{name} adds a final_logits_bias, which the fused loss does not apply: use compute_loss_func"
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return (f"{name}'s output embedding is {type(head).__name__}, not a torch.nn.Linear: "
                f"the fused loss needs logits = lm_head(hidden)")
    if model.base_model is model:
        return f"{name} has no base model (base_model_prefix {model.base_model_prefix!r}) to take hidden states from"
    return None


def fuse_encouraging_loss(model, **el_options):
    """Make `model` (a transformers causal LM) return the encouraging loss without logits in training;
    returns the model. el_options: any option of `el_fairseq.encouraging_linear_loss` (those of
    encouraging_loss, and chunk_size), checked now."""
    check_el_options(el_options, encouraging_linear_loss,
                     (torch.zeros(1, 2), torch.zeros(2, 2), torch.zeros(1, dtype=torch.long)))
    reason = refusal(model)
    if reason:
        raise ValueError(reason)
    model.el_options = dict(el_options)

    # With the model's own signature: Trainer reads it to choose the batch's columns.
    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        return _fused_forward(self, *args, **kwargs)

    # Bound to this instance, not set on its class; a deep copy of the model rebinds it to the copy.
    model.forward = types.MethodType(forward, model)
    model.accepts_loss_kwargs = True  # the forward takes num_items_in_batch: Trainer then passes it
    if _refuse_bypass not in model.base_model._forward_pre_hooks.values():  # once, also when fused again
        model.base_model.register_forward_pre_hook(_refuse_bypass)
    return model


@contextlib.contextmanager
def sanctioned_backbone_calls():
    """Inside the block, backbone calls of a fused model are taken to apply the encouraging loss: this
    forward's own, and those of a trainer that computes EL itself (EncouragingSFTTrainer)."""
    _SANCTIONED.depth = getattr(_SANCTIONED, "depth", 0) + 1
    try:
        yield
    finally:
        _SANCTIONED.depth -= 1


def _refuse_bypass(backbone, args):
    """Forward pre-hook of a fused model's backbone: a training call with gradients outside the fused forward
    means a trainer replaced that forward (TRL's SFTTrainer) and trains with its own loss."""
    if backbone.training and torch.is_grad_enabled() and not getattr(_SANCTIONED, "depth", 0):
        raise ValueError("fuse_encouraging_loss: the model's forward was bypassed (the backbone is trained without "
                         "it, e.g. by TRL's SFTTrainer, whose fused head computes NLL): use "
                         "el_fairseq.hf.trl.EncouragingSFTTrainer(..., el_options=...) for TRL")


def _fused_forward(self, *args, **kwargs):
    with sanctioned_backbone_calls():
        return _fused_forward_body(self, *args, **kwargs)


def _fused_forward_body(self, *args, **kwargs):
    own_forward = type(self).forward
    signature = inspect.signature(own_forward)
    call = signature.bind(self, *args, **kwargs).arguments
    call.pop(next(iter(signature.parameters)))  # self
    for p in signature.parameters.values():  # the model's **kwargs, passed on by name like the rest
        if p.kind is p.VAR_KEYWORD:
            call.update(call.pop(p.name, {}))
    labels, shifted = call.pop("labels", None), call.pop("shift_labels", None)
    if labels is None and shifted is None:
        return own_forward(self, **call)
    num_items_in_batch = call.pop("num_items_in_batch", None)
    call.pop("logits_to_keep", None)  # the loss needs every position
    target = shift_labels(labels) if shifted is None else shifted
    if not self.training:  # evaluation: the logits, and the same loss from them
        outputs = own_forward(self, **call)
        options = {k: v for k, v in self.el_options.items() if k != "chunk_size"}  # the projection's only
        outputs["loss"] = trainer_loss(outputs["logits"], target, num_items_in_batch, **options)
        return outputs
    reason = refusal(self)  # e.g. a head wrapped since (FSDP1's wrapper unshards in its forward, not in hooks)
    if reason:
        raise ValueError(reason)
    base = self.base_model(**call)
    hidden = base[0]
    target = target.reshape(-1).to(hidden.device)
    loss_sum = head_loss_sum(self.get_output_embeddings(), hidden.reshape(-1, hidden.size(-1)), target,
                             self.el_options)
    loss = normalise(loss_sum, num_items_in_batch, target.ne(IGNORE_INDEX).sum())
    return _causal_lm_output(loss, base)


def head_loss_sum(head, hidden, target, el_options):
    """The summed encouraging loss of head(hidden) (N, V) for target (N,), without the logits, computed by
    the call `head(hidden)` itself: for that call the head's forward is the fused loss, so whatever holds
    its parameters does what it does for the model's own projection. Its forward pre-hooks materialise
    the weight (FSDP2's unshard, DeepSpeed ZeRO-3's gather, accelerate's device hooks, which also move
    `hidden` to the head's device), the loss is their output (FSDP2 and ZeRO-3 gather the weight again
    for its backward from their hooks on it), and the weight's gradient reaches the parameter the
    forward read, where the engine reduces it (DDP's all-reduce, FSDP2's reduce-scatter after the
    head's backward, ZeRO-3's reduce-scatter)."""
    def fused_forward(features):  # reads the parameters as the head's pre-forward hooks left them
        return encouraging_linear_loss(features, head.weight, target.to(features.device), linear_bias=head.bias,
                                       ignore_index=IGNORE_INDEX, reduction="sum", **el_options)

    with _forward_replaced(head, fused_forward):
        return head(hidden)


@contextlib.contextmanager
def _forward_replaced(module, forward):
    """`module`'s own forward is `forward` inside the block, on this instance only; calling the module runs
    its hooks around it as usual. accelerate's hooks keep the module's forward as `_old_forward` and call
    it from theirs (the instance's `forward`): that one is replaced then, so their pre_forward still runs."""
    name = "_old_forward" if "_old_forward" in vars(module) else "forward"
    previous = vars(module).get(name)
    setattr(module, name, forward)
    try:
        yield
    finally:
        if previous is None:  # not delattr: torch.compile would replay it after its graph, on a module never set
            vars(module).pop(name)
        else:
            setattr(module, name, previous)


def _causal_lm_output(loss, base):
    """The causal-LM output of transformers (loss, no logits) with the base model's other fields."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = CausalLMOutputWithPast.__dataclass_fields__
    passed = {k: v for k, v in base.items() if k in fields and k != "logits"} if hasattr(base, "items") else {}
    return CausalLMOutputWithPast(loss=loss, logits=None, **passed)
