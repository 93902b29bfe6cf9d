"""fairseq criterion for the encouraging loss: a thin adapter over el_fairseq.loss.

    loss = LS-CE(z, y) + rho_t * [(1 - eps_b) b(p_y) + eps_b / V sum_j b(p_j)]   (see loss/bonus.py)

Registered as `encouraging_loss` and `encouraging_label_smoothed_cross_entropy` (one class), and
`label_smoothed_cross_entropy_with_diagnostics`: fairseq's LS-CE, numerically unchanged, that also
logs the margin/energy diagnostics so CE baselines can be compared with EL runs.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics

from ..loss.bonus import BONUS_KINDS, SCHEDULES, BonusSpec, EncouragingLossOptionError, scheduled_rho
from ..loss.diagnostics import summarize, token_stats_from_logits
from ..loss.dispatch import IMPLS, encouraging_loss, resolve_impl
from ..loss.linear import fused_linear_encouraging_loss

@dataclass
class EncouragingLossConfig(LabelSmoothedCrossEntropyCriterionConfig):
    bonus: ChoiceEnum(BONUS_KINDS) = field(
        default="log",
        metadata={"help": "bonus b(p): log = log(1-p) (authors' --bonus_gamma -1), power = -p^gamma "
                  "(--bonus_gamma >= 1), cosine = cos(pi p) - 1 (--bonus_gamma -2)"},
    )
    log_end: float = field(
        default=0.5,
        metadata={"help": "LE in (0, 1]: beyond p = LE the log bonus continues along its tangent "
                  "(conservative bonus); 1 = the plain log bonus"},
    )
    bonus_rho: float = field(default=1.0, metadata={"help": "weight rho >= 0 of the bonus; 0 = LS-CE"})
    bonus_label_smoothing: Optional[float] = field(
        default=None,
        metadata={"help": "eps_b in [0, 1): label smoothing of the bonus (authors' --el_lb); "
                  "default: the value of --label-smoothing"},
    )
    bonus_gamma: float = field(default=1.0, metadata={"help": "exponent gamma >= 1 of --bonus power"})
    bonus_start: float = field(
        default=0.0,
        metadata={"help": "bonus start s in [0, 1): b(p) - b(s) for p >= s, 0 below (authors' --bonus_start)"},
    )
    bonus_schedule: ChoiceEnum(SCHEDULES) = field(
        default="constant",
        metadata={"help": "ramp of rho over --bonus-schedule-updates (authors' --el_schedule): "
                  "linear t/T, exp exp((t/T-1) r), cos (cos(pi(1+t/T))+1)/2"},
    )
    bonus_schedule_updates: int = field(
        default=0, metadata={"help": "horizon T of --bonus-schedule in updates (rho is full after it)"}
    )
    bonus_schedule_exp_ratio: float = field(
        default=5.0, metadata={"help": "r of the exp schedule (authors' --el_exp_schedule_ratio)"}
    )
    el_impl: ChoiceEnum(IMPLS) = field(
        default="auto",
        metadata={"help": "auto = native (compiled C) for float32 CPU logits, triton for CUDA logits, "
                  "chunked (fused torch ops) elsewhere; reference = plain torch with autograd (also used "
                  "with adaptive softmax); native/triton fall back to chunked with a warning"},
    )
    # Diagnostics are on by default. fairseq turns a bool field whose default is True into a
    # store_false flag, so `--log-diagnostics` would switch them off: the flag that switches them
    # off is its own field, and log_diagnostics (None = not said) only says "on" or, from a hydra
    # config, false = off.
    log_diagnostics: Optional[bool] = field(
        default=None,
        metadata={"help": "log mean margin, energy, p_y and the well-classified share (p_y > 0.5): the default"},
    )
    no_log_diagnostics: bool = field(
        default=False, metadata={"help": "do not compute or log the diagnostics"},
    )
    el_fused_projection: bool = field(
        default=False,
        metadata={"help": "run the decoder with features_only=True and take the loss from its features and "
                  "output projection in token chunks, without the (tokens x V) logits (large vocabularies); "
                  "needs a plain output projection (no adaptive softmax)"},
    )


def _current_num_updates() -> int:
    """The trainer's update count: fairseq's Trainer.set_num_updates logs it as the `num_updates`
    meter of the always-active "default" aggregator (also on resume). Criteria are not told it."""
    meter = metrics.get_meter("default", "num_updates")
    return int(getattr(meter, "val", 0) or 0) if meter is not None else 0


def _log_diagnostics(logging_outputs):
    tokens = utils.item(sum(log.get("diag_tokens", 0) for log in logging_outputs))
    if not tokens:
        return
    for key, name in (("margin_sum", "margin"), ("energy_sum", "energy"), ("p_y_sum", "p_y")):
        total = utils.item(sum(log.get(key, 0) for log in logging_outputs))
        metrics.log_scalar(name, total / tokens, tokens, round=3)
    well = utils.item(sum(log.get("well_classified", 0) for log in logging_outputs))
    metrics.log_scalar("well_classified_pct", 100.0 * well / tokens, tokens, round=2)


class _DiagnosticsMixin:
    """Margin/energy logging for any LS-CE-shaped criterion."""

    def _logging_output(self, model, net_output, sample, loss, nll_loss, extra, accuracy=None):
        """fairseq LS-CE's logging output (plus `extra`); returns (sample_size, logging_output).
        accuracy: (n_correct, total) when there are no logits to take it from."""
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
            **extra,
        }
        if self.report_accuracy:
            n_correct, total = accuracy if accuracy is not None else self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return sample_size, logging_output

    def _logits_and_target(self, model, net_output, sample):
        """Raw logits (B, T, V) when the decoder's output is a plain projection, else None."""
        decoder = getattr(model, "decoder", None)
        if getattr(decoder, "adaptive_softmax", None) is not None:
            return None, None
        logits = net_output[0]
        target = model.get_targets(sample, net_output)
        if self.ignore_prefix_size > 0:
            logits = logits[:, self.ignore_prefix_size:, :]
            target = target[:, self.ignore_prefix_size:]
        return logits, target

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        _log_diagnostics(logging_outputs)


@register_criterion("encouraging_loss", dataclass=EncouragingLossConfig)
class EncouragingLossCriterion(_DiagnosticsMixin, LabelSmoothedCrossEntropyCriterion):
    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        ignore_prefix_size=0,
        report_accuracy=False,
        bonus="log",
        log_end=0.5,
        bonus_rho=1.0,
        bonus_label_smoothing=None,
        bonus_gamma=1.0,
        bonus_start=0.0,
        bonus_schedule="constant",
        bonus_schedule_updates=0,
        bonus_schedule_exp_ratio=5.0,
        el_impl="auto",
        log_diagnostics=None,
        no_log_diagnostics=False,
        el_fused_projection=False,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        if not 0.0 <= label_smoothing < 1.0:
            raise EncouragingLossOptionError(
                f"--label-smoothing {label_smoothing!r} is out of range: allowed 0 <= eps < 1")
        if ignore_prefix_size < 0:
            raise EncouragingLossOptionError(
                f"--ignore-prefix-size {ignore_prefix_size!r} is out of range: allowed >= 0")
        eps_b = label_smoothing if bonus_label_smoothing is None else bonus_label_smoothing
        self.spec = BonusSpec(str(bonus), log_end, bonus_gamma, bonus_start, eps_b, bonus_rho)
        self.bonus_schedule = str(bonus_schedule)
        self.bonus_schedule_updates = bonus_schedule_updates
        self.bonus_schedule_exp_ratio = bonus_schedule_exp_ratio
        scheduled_rho(bonus_rho, self.bonus_schedule, 0, bonus_schedule_updates, bonus_schedule_exp_ratio)
        self.el_impl = resolve_impl(str(el_impl))
        if no_log_diagnostics and log_diagnostics:
            raise EncouragingLossOptionError("--log-diagnostics and --no-log-diagnostics contradict each other: "
                                             "pass one of them")
        self.log_diagnostics = not no_log_diagnostics and log_diagnostics is not False
        self.el_fused_projection = bool(el_fused_projection)

    def current_spec(self) -> BonusSpec:
        if self.bonus_schedule == "constant":
            return self.spec
        rho = scheduled_rho(self.spec.rho, self.bonus_schedule, _current_num_updates(),
                            self.bonus_schedule_updates, self.bonus_schedule_exp_ratio)
        return BonusSpec(self.spec.kind, self.spec.log_end, self.spec.gamma, self.spec.start,
                         self.spec.epsilon, rho)

    def forward(self, model, sample, reduce=True):
        if self.el_fused_projection:
            return self._fused_projection_forward(model, sample, reduce)
        net_output = model(**sample["net_input"])
        loss, nll_loss, extra = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size, logging_output = self._logging_output(model, net_output, sample, loss, nll_loss, extra)
        return loss, sample_size, logging_output

    def compute_loss(self, model, net_output, sample, reduce=True):
        spec = self.current_spec()
        logits, target = self._logits_and_target(model, net_output, sample)
        if logits is None:  # adaptive softmax: only normalized log-probs exist
            lprobs, target = self.get_lprobs_and_target(model, net_output, sample)
            from ..loss.reference import encouraging_nll_loss

            loss, nll = encouraging_nll_loss(lprobs, target, self.eps, spec, self.padding_idx, reduce)
            return (loss, nll, {}) if reduce else (*self._as_fairseq_unreduced(loss, nll), {})
        out = encouraging_loss(logits, target, self.eps, spec, ignore_index=self.padding_idx, reduce=False,
                               impl=self.el_impl, with_stats=self.log_diagnostics, check_spec=self.spec)
        loss, nll = out[:2]
        extra = summarize(out[2], nll, target, self.padding_idx) if self.log_diagnostics else {}
        if reduce:
            loss, nll = loss.sum(), nll.sum()
        else:
            loss, nll = self._as_fairseq_unreduced(loss, nll)
        return loss, nll, extra

    def _as_fairseq_unreduced(self, loss, nll):
        """Per-token (loss, nll) shaped as fairseq's label_smoothed_nll_loss returns them with reduce=False:
        (tokens, 1) when there is a padding index (always, with a dictionary), else (tokens,)."""
        if self.padding_idx is None:
            return loss, nll
        return loss.unsqueeze(-1), nll.unsqueeze(-1)

    def _fused_projection_forward(self, model, sample, reduce):
        """--el-fused-projection: the decoder's features and its output projection's weight (the shared
        embedding's with --share-decoder-input-output-embed: autograd accumulates both uses into the one
        parameter, as without the flag) go to the fused linear loss; accuracy comes from the margins
        (the target is the argmax where z_y > max_{j != y} z_j; exact ties count as wrong)."""
        projection = _output_projection(model)
        features, extra_out = model(**sample["net_input"], features_only=True)
        target = model.get_targets(sample, (features, extra_out))
        if self.ignore_prefix_size > 0:
            features = features[:, self.ignore_prefix_size:, :]
            target = target[:, self.ignore_prefix_size:]
        loss, nll, stats = fused_linear_encouraging_loss(features, projection.weight, projection.bias, target, self.eps,
                                                         self.current_spec(), ignore_index=self.padding_idx,
                                                         reduce=reduce, impl=self.el_impl, check_spec=self.spec)
        flat = target.reshape(-1)
        extra = summarize(stats, nll, flat, self.padding_idx) if self.log_diagnostics else {}
        kept = flat.ne(self.padding_idx)
        accuracy = (((stats[:, 1] > 0) & kept).sum(), kept.sum())
        loss, nll = (loss, nll.sum()) if reduce else self._as_fairseq_unreduced(loss, nll)
        return (loss, *self._logging_output(model, None, sample, loss, nll, extra, accuracy))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def _output_projection(model):
    """The decoder's plain output projection (an nn.Linear), or a one-line refusal."""
    decoder = getattr(model, "decoder", None)
    projection = getattr(decoder, "output_projection", None)
    if getattr(decoder, "adaptive_softmax", None) is not None:
        raise EncouragingLossOptionError("--el-fused-projection needs a plain output projection: this decoder "
                                         "uses adaptive softmax (drop one of the two)")
    if not isinstance(projection, torch.nn.Linear):
        raise EncouragingLossOptionError(f"--el-fused-projection needs a decoder with a plain output projection "
                                         f"(decoder.output_projection, nn.Linear): {type(decoder).__name__} has none")
    return projection


@register_criterion("encouraging_label_smoothed_cross_entropy", dataclass=EncouragingLossConfig)
class EncouragingLabelSmoothedCrossEntropyCriterion(EncouragingLossCriterion):
    """The same criterion under the name that says what it extends."""


@register_criterion(
    "label_smoothed_cross_entropy_with_diagnostics", dataclass=LabelSmoothedCrossEntropyCriterionConfig
)
class LabelSmoothedCrossEntropyWithDiagnostics(_DiagnosticsMixin, LabelSmoothedCrossEntropyCriterion):
    """fairseq's LS-CE, loss and gradient untouched, plus the margin/energy logging outputs."""

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        # fairseq's compute_loss, spelled out to keep its log-probabilities for p_y (no extra pass).
        lprobs, target = self.get_lprobs_and_target(model, net_output, sample)
        loss, nll_loss = label_smoothed_nll_loss(lprobs, target, self.eps, ignore_index=self.padding_idx,
                                                 reduce=reduce)
        extra = {}
        logits, _ = self._logits_and_target(model, net_output, sample)
        if logits is not None:
            safe = target.masked_fill(target.eq(self.padding_idx), 0)
            nll = -lprobs.detach().gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            extra = summarize(token_stats_from_logits(logits.detach(), target, self.padding_idx), nll, target,
                              self.padding_idx)
        sample_size, logging_output = self._logging_output(model, net_output, sample, loss, nll_loss, extra)
        return loss, sample_size, logging_output

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
