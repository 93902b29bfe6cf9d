"""The encouraging loss in TRL's `SFTTrainer`, fused (never the (tokens, vocabulary) logits), with TRL's metrics.

    from el_fairseq.hf.trl import EncouragingSFTTrainer      # or: from el_fairseq.hf import EncouragingSFTTrainer
    trainer = EncouragingSFTTrainer(model=model, args=SFTConfig(...), train_dataset=train,
                                    el_options={"log_end": 0.75})          # was: SFTTrainer(model=model, ...)

Every SFTTrainer argument is taken as it is; `el_options` holds any option of `el_fairseq.encouraging_loss`
(log_end, bonus, bonus_rho, bonus_label_smoothing, bonus_gamma, bonus_start, label_smoothing, weight, impl)
and `chunk_size` of `encouraging_linear_loss`; None: the defaults. The loss is

    loss = sum_{t: label_{t+1} != -100} EL(z_t, label_{t+1}) / num_items_in_batch

(TRL's own rule for `loss_type="nll"`: the batch's count of labels without num_items_in_batch, a batch with
none a zero loss; the same factor under `average_tokens_across_devices`), and TRL logs what it logs for nll
(`entropy`, `mean_token_accuracy`, `num_tokens`, `aux_loss` for MoE) under its names. Two fused paths:

- EL without label smoothing (label_smoothing = bonus_label_smoothing = 0, impl "auto", no chunk_size; the
  defaults) is a per-token function of log p_y, as TRL's DFT is: with p = p_y,

      EL_t = w_y [ -log p + rho * b(p) ]      (b: el_fairseq.loss.bonus; w_y = 1 without a class weight)

  computed from the per-token `log_probs` of TRL's fused LM head (`model(..., fused_lm_head=True)`, which
  SFTTrainer adds to every model), whose `entropy` and `is_top1` feed the metrics from the same pass. TRL's
  head applies the model's logit soft-capping and scaling, so every model TRL trains takes EL this way.
- Smoothed EL needs sums over the vocabulary that TRL's head does not return: the trainer adds its own head
  (`encouraging_lm_head=True` on the same forward), which projects the hidden states of the labelled
  positions chunk by chunk (`chunk_size` rows, default `default_chunk_size(V)`), and per chunk takes the
  loss and its gradient from `encouraging_loss` (its fused kernel) and the entropy
  H = logsumexp(z) - sum_v p_v z_v and top-1 (argmax z = y, the first maximum, as TRL's) from the same
  logits. Models whose logits are not a plain projection (soft-capping, scaling) are refused in one line.

Refused in one line: `compute_loss_func` (the loss is EL), `loss_type` other than "nll", SFTConfig's
`label_smoothing_factor` (use el_options' label_smoothing), DeepSpeed sequence parallelism (TRL reduces the
model's own NLL there). A `fuse_encouraging_loss` model is accepted (its options are the default
el_options). Tested with TRL 1.16.0 (transformers 5.25): TRL >= 1.16, whose SFTTrainer has the fused head.
"""
import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import trl
from packaging.version import Version
from transformers.utils import ModelOutput

from ..loss.api import encouraging_loss, make_spec
from ..loss.bonus import bonus_value
from ..loss.linear import default_chunk_size, encouraging_linear_loss
from ..loss.linear_ops import accumulate_projection_grads
from .fused import _forward_replaced, refusal, sanctioned_backbone_calls
from .loss import IGNORE_INDEX, check_el_options

MIN_TRL = "1.16.0"  # SFTTrainer's fused LM head (trl.trainer.utils.add_fused_lm_head)
LINEAR_ONLY = ("chunk_size",)  # options of encouraging_linear_loss that encouraging_loss does not take


def per_token_path(el_options) -> bool:
    """Whether EL with these options is a per-token function of log p_y (no label or bonus smoothing) and
    asks for no kernel or chunking of its own: then it rides on TRL's fused head."""
    return (el_options.get("label_smoothing", 0.0) == 0.0 and el_options.get("bonus_label_smoothing", 0.0) == 0.0
            and el_options.get("impl", "auto") == "auto" and el_options.get("chunk_size") is None)


def spec_of(el_options):
    """The BonusSpec of encouraging_loss's options (its defaults where not given)."""
    defaults = {n: p.default for n, p in inspect.signature(encouraging_loss).parameters.items()}
    get = lambda name: el_options.get(name, defaults[name])  # noqa: E731
    return make_spec(get("bonus"), get("log_end"), get("bonus_gamma"), get("bonus_start"),
                     get("bonus_label_smoothing"), get("bonus_rho"))


def per_token_encouraging_loss(log_probs, label_mask, spec, class_weight=None, labels=None):
    """EL_t = w_y [-log p + rho b(p)] of each token from its log p_y (zero where label_mask is False);
    differentiable in log_probs. 1 - p is -expm1(log p), which keeps its precision for p near 1."""
    log_p = log_probs.float()
    loss = -log_p
    if spec.active:
        loss = loss + spec.rho * bonus_value(log_p.exp(), -torch.expm1(log_p), spec)
    if class_weight is not None:
        loss = loss * class_weight.to(loss)[labels.masked_fill(~label_mask, 0)]
    return loss.masked_fill(~label_mask, 0.0)


@dataclass
class EncouragingLMOutput(ModelOutput):
    """The encouraging head's output, per token zero where the label is -100 (TRL's FusedCausalLMOutput's
    fields that SFTTrainer reads, with the loss summed rather than normalised)."""

    loss_sum: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class _LossAndMetrics(torch.autograd.Function):
    """Summed EL of logits x W^T + b over row chunks, with each row's entropy and top-1 from the same logits.
    The gradients are computed in the forward (as encouraging_linear_loss does for a summed loss) and scaled
    by the upstream scalar in backward; only (chunk, V) buffers exist."""

    @staticmethod
    def forward(ctx, x, w, b, target, loss_options, step):
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        wanted = ctx.needs_input_grad[:3]
        w_work = w.detach().to(work)
        b_work = None if b is None else b.detach().to(work)
        n = x.size(0)
        grad_x = x.new_empty(x.shape, dtype=work) if wanted[0] else None
        grad_w = torch.zeros_like(w_work) if wanted[1] else None
        grad_b = torch.zeros_like(b_work) if wanted[2] and b is not None else None
        total = x.new_zeros((), dtype=work)
        entropy = x.new_zeros(n, dtype=torch.float32)
        top1 = torch.zeros(n, dtype=torch.bool, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            for start in range(0, n, step):
                rows = slice(start, min(start + step, n))
                x_c = x[rows].detach().to(work)
                z = F.linear(x_c, w_work, b_work)
                with torch.enable_grad():
                    leaf = z.requires_grad_(any(wanted))
                    loss = encouraging_loss(leaf, target[rows], ignore_index=IGNORE_INDEX, reduction="sum",
                                            **loss_options)
                    g = torch.autograd.grad(loss, leaf)[0] if any(wanted) else None
                total += loss.detach()
                z = z.detach()
                entropy[rows] = _entropy(z)
                top1[rows] = z.argmax(-1).eq(target[rows])  # the first maximum, as TRL's is_top1
                del z
                if g is None:
                    continue
                accumulate_projection_grads(g, x_c, w_work, rows, grad_x, grad_w, grad_b)
                del g
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_x, grad_w, grad_b)))
        ctx.present = (grad_x is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (x.dtype, w.dtype, None if b is None else b.dtype)
        ctx.mark_non_differentiable(entropy, top1)
        return total, entropy, top1

    @staticmethod
    def backward(ctx, grad_total, grad_entropy, grad_top1):
        out = [(g * grad_total.to(g.dtype)).to(dtype) if present else None
               for g, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes)]
        return (*out, None, None, None)


def _entropy(z):
    """-sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v of each row of logits z (float32)."""
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    return (lse.squeeze(-1) - (torch.exp(z - lse) * z).sum(-1)).float()


def head_loss_and_metrics(head, hidden, target, el_options):
    """(summed EL, entropy (N,), is_top1 (N,)) of head(hidden) (N, V) for target (N,), without the logits,
    computed by the call `head(hidden)` itself so the head's hooks (FSDP2, ZeRO-3, accelerate) run as for the
    model's own projection (el_fairseq.hf.fused.head_loss_sum)."""
    loss_options = {k: v for k, v in el_options.items() if k not in LINEAR_ONLY}
    step = el_options.get("chunk_size") or default_chunk_size(head.weight.size(0))

    def fused_forward(features):
        return _LossAndMetrics.apply(features, head.weight, head.bias, target.to(features.device), loss_options,
                                     step)

    with _forward_replaced(head, fused_forward):
        return head(hidden)


def add_encouraging_lm_head(model, el_options):
    """Let `model(..., fused_lm_head=True, encouraging_lm_head=True)` return an EncouragingLMOutput (smoothed
    EL and the metrics of head_loss_and_metrics); every other call goes to the forward it had (TRL's fused
    head's, which keeps the model's own). Patched on this instance, as TRL patches its head."""
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, encouraging_lm_head=False, **kwargs):
        if not encouraging_lm_head:
            return previous(*args, **kwargs)
        return _encouraging_forward(self, el_options, *args, **kwargs)

    model.forward = forward.__get__(model)


def _encouraging_forward(self, el_options, *args, fused_lm_head=True, labels=None, shift_labels=None,
                         num_items_in_batch=None, **kwargs):
    """TRL's fused forward with our head: the backbone, then the positions whose next-token label is not
    -100 (pre-shifted `shift_labels` as they are: context / sequence parallelism)."""
    kwargs["use_cache"] = False
    backbone = self.base_model(*args, **kwargs)
    hidden = backbone.last_hidden_state
    if shift_labels is None:
        hidden, target = hidden[:, :-1], labels[:, 1:]
    else:
        target = shift_labels
    head = self.get_output_embeddings()
    target = target.to(head.weight.device)
    mask = target.ne(IGNORE_INDEX)
    loss_sum, entropy, top1 = head_loss_and_metrics(head, hidden.to(head.weight.device)[mask], target[mask],
                                                    el_options)
    return EncouragingLMOutput(loss_sum=loss_sum, entropy=entropy.new_zeros(mask.shape).masked_scatter(mask, entropy),
                               is_top1=top1.new_zeros(mask.shape).masked_scatter(mask, top1), label_mask=mask)


def _bound_arguments(args, kwargs):
    signature = inspect.signature(trl.SFTTrainer.__init__)
    return signature.bind_partial(None, *args, **kwargs).arguments


def _el_options_of(model, el_options):
    """el_options, or a fused model's own (fuse_encouraging_loss) when None; both and different: refused."""
    fused = getattr(model, "el_options", None) if isinstance(model, torch.nn.Module) else None
    if el_options is None:
        return dict(fused or {})
    if fused is not None and not _same_options(fused, el_options):
        raise ValueError(f"the model is fused with el_options {describe(fused)} and el_options={describe(el_options)} "
                         f"was passed: give one of them")
    return dict(el_options)


def _same_options(a, b):
    same = lambda x, y: x is y if torch.is_tensor(x) or torch.is_tensor(y) else x == y  # noqa: E731
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def describe(el_options):
    """el_options on one line: a tensor (a class weight) by its shape."""
    shown = (f"{k}={'tensor' + str(tuple(v.shape)) if torch.is_tensor(v) else repr(v)}" for k, v in el_options.items())
    return "{" + ", ".join(shown) + "}"


class EncouragingSFTTrainer(trl.SFTTrainer):
    """TRL's SFTTrainer training with the encouraging loss, fused (module docstring): every SFTTrainer
    argument, plus `el_options` (a dict of encouraging_loss's options and chunk_size; None: the defaults)."""

    def __init__(self, *args, el_options=None, **kwargs):
        if Version(trl.__version__) < Version(MIN_TRL):
            raise ImportError(f"EncouragingSFTTrainer needs trl >= {MIN_TRL} (its fused LM head), found "
                              f"{trl.__version__}")
        bound = _bound_arguments(args, kwargs)
        if bound.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func is not allowed with EncouragingSFTTrainer: its loss is the "
                             "encouraging loss (set el_options), fused")
        el_options = _el_options_of(bound.get("model"), el_options)
        check_el_options(el_options, encouraging_linear_loss,
                         (torch.zeros(1, 2), torch.zeros(2, 2), torch.zeros(1, dtype=torch.long)))
        loss_options = {k: v for k, v in el_options.items() if k not in LINEAR_ONLY}
        self.el_options = el_options
        self._el_spec = spec_of(loss_options)
        self._el_per_token = per_token_path(el_options)
        config = bound.get("args")
        self._check_config(config)
        super().__init__(*args, **kwargs)
        self._check_config(self.args)
        self._refuse_deepspeed_sequence_parallel()
        if not self._el_per_token:
            model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            reason = refusal(model)
            if reason:
                raise ValueError(f"{reason} (smoothed EL, el_options {describe(el_options)}, takes our fused head; "
                                 f"without label_smoothing and bonus_label_smoothing it takes TRL's)")
            if self.aux_loss_enabled:
                raise ValueError(f"{type(model).__name__} adds a router load-balancing loss, which our fused head "
                                 f"(smoothed EL, el_options {describe(el_options)}) does not compute: set "
                                 f"SFTConfig(router_aux_loss_coef=0.0) or drop label_smoothing and "
                                 f"bonus_label_smoothing")
            add_encouraging_lm_head(model, el_options)

    @staticmethod
    def _check_config(config):
        if config is None:
            return
        if getattr(config, "loss_type", "nll") != "nll":
            raise ValueError(f"loss_type {config.loss_type!r} is not allowed with EncouragingSFTTrainer: its loss "
                             f"is the encouraging loss; allowed 'nll' (the default)")
        if getattr(config, "label_smoothing_factor", 0.0):
            raise ValueError(f"label_smoothing_factor {config.label_smoothing_factor} is not allowed with "
                             f"EncouragingSFTTrainer: pass el_options={{'label_smoothing': ...}}")

    def _refuse_deepspeed_sequence_parallel(self):
        config = getattr(self.accelerator, "parallelism_config", None)
        if config is not None and getattr(config, "sp_enabled", False) and config.sp_backend == "deepspeed":
            raise ValueError("DeepSpeed sequence parallelism (Ulysses/ALST) is not supported by "
                             "EncouragingSFTTrainer: TRL reduces the model's own NLL across ranks there")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The encouraging loss of the batch under TRL's nll rule, and TRL's metrics (SFTTrainer.compute_loss
        of TRL 1.16 with the loss replaced)."""
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        with sanctioned_backbone_calls():
            if self._el_per_token:
                outputs = model(**inputs, fused_lm_head=True)
                loss_sum = self._per_token_loss(outputs, inputs).sum()
            else:
                outputs = model(**inputs, fused_lm_head=True, encouraging_lm_head=True)
                loss_sum = outputs.loss_sum
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        # Clamped as TRL does: a batch without trainable tokens gives a finite zero, not 0 / 0
        loss = loss_sum / torch.as_tensor(num_tokens, device=loss_sum.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled and outputs.aux_loss is not None:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
        self._record_metrics(mode, inputs, outputs)
        if return_outputs:  # TRL's deprecated path: the logits take one more (no-grad) forward
            with torch.no_grad(), sanctioned_backbone_calls():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return (loss, outputs) if return_outputs else loss

    def _per_token_loss(self, outputs, inputs):
        weight = self.el_options.get("weight")
        labels = None
        if weight is not None:
            labels = inputs["shift_labels"] if "shift_labels" in inputs else inputs["labels"][:, 1:]
        return per_token_encouraging_loss(outputs.log_probs, outputs.label_mask, self._el_spec, weight, labels)

    def _record_metrics(self, mode, inputs, outputs):
        """TRL's SFTTrainer metrics (1.16's compute_loss): entropy and mean_token_accuracy over the labelled
        tokens of all processes, num_tokens (attention_mask's, or padding-free position_ids' count), aux_loss."""
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(outputs.label_mask.sum()).sum()
        entropy_sum = gather(outputs.entropy.detach().sum()).sum()
        num_correct = gather(outputs.is_top1.sum()).sum()
        metrics = self._metrics[mode]
        metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                count = gather(inputs["attention_mask"].sum()).sum().item()
            elif "position_ids" in inputs:
                position_ids = inputs["position_ids"]
                count = gather(torch.tensor(position_ids.size(1), device=position_ids.device)).sum().item()
            else:
                raise ValueError("expected 'attention_mask' or 'position_ids' in the batch (TRL's collator gives one)")
            self._total_train_tokens += count // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled and outputs.aux_loss is not None:
            metrics["aux_loss"].append(gather(outputs.aux_loss).mean().item())
