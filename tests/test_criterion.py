"""The fairseq criterion: registry names, equality with fairseq's LS-CE, options, schedule, logging."""
import math

import pytest
import torch
from fairseq.logging import metrics

from el_fairseq.loss.bonus import EncouragingLossOptionError
from fairseq_fixtures import PAD, TinyModel, build, make_sample
from reference64 import el_loss64

NAMES = ["encouraging_loss", "encouraging_label_smoothed_cross_entropy"]
VOCAB = 40


def loss_and_grad(criterion, sample, seed=0):
    model = TinyModel(VOCAB, seed)
    loss, sample_size, log = criterion(model, sample)
    loss.backward()
    return loss.detach(), model.table.grad, log, sample_size


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("impl", ["reference", "chunked", "native"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_bonus_off_equals_fairseq_ls_ce(name, impl, eps):
    sample = make_sample(5, 7, VOCAB)
    ours = loss_and_grad(build(name, label_smoothing=eps, bonus_rho=0.0, el_impl=impl), sample)
    theirs = loss_and_grad(build("label_smoothed_cross_entropy", label_smoothing=eps), sample)
    assert abs(float(ours[0]) - float(theirs[0])) <= 1e-9 + 1e-6 * abs(float(theirs[0]))
    assert torch.allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-7)
    for key in ("loss", "nll_loss", "ntokens", "nsentences", "sample_size"):
        assert torch.allclose(torch.as_tensor(ours[2][key]).double(), torch.as_tensor(theirs[2][key]).double(), rtol=1e-6)
    assert ours[3] == theirs[3]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("impl", ["reference", "chunked", "native"])
@pytest.mark.parametrize("log_end,eps_b", [(0.5, None), (0.75, 0.0), (1.0, 0.2)])
def test_criterion_equals_float64_formula(name, impl, log_end, eps_b):
    sample = make_sample(5, 7, VOCAB, seed=3)
    criterion = build(name, label_smoothing=0.1, log_end=log_end, bonus_label_smoothing=eps_b, el_impl=impl)
    loss, grad, log, _ = loss_and_grad(criterion, sample)
    table = TinyModel(VOCAB).table.detach().double().requires_grad_(True)
    want, want_nll = el_loss64(table[sample["net_input"]["src_tokens"]], sample["target"], 0.1,
                               0.1 if eps_b is None else eps_b, 1.0, PAD, "log", log_end)
    want.backward()
    assert math.isclose(float(loss), float(want), rel_tol=1e-5)
    assert math.isclose(float(log["nll_loss"]), float(want_nll), rel_tol=1e-5)
    assert torch.allclose(grad.double(), table.grad, rtol=1e-4, atol=1e-5)


def test_defaults_are_the_authors_translation_recipe():
    c = build("encouraging_loss", label_smoothing=0.1)
    assert (c.spec.kind, c.spec.log_end, c.spec.epsilon, c.spec.rho) == ("log", 0.5, 0.1, 1.0)
    assert build("encouraging_loss", label_smoothing=0.2).spec.epsilon == 0.2
    assert build("encouraging_loss", label_smoothing=0.2, bonus_label_smoothing=0.0).spec.epsilon == 0.0


@pytest.mark.parametrize("option,value,message", [
    ("log_end", 0.0, "--log-end 0.0 is out of range: allowed 0 < LE <= 1"),
    ("log_end", 1.5, "--log-end 1.5 is out of range: allowed 0 < LE <= 1"),
    ("bonus_rho", -0.1, "--bonus-rho -0.1 is out of range: allowed rho >= 0"),
    ("bonus_rho", float("inf"), "--bonus-rho inf is out of range"),
    ("bonus_label_smoothing", 1.0, "--bonus-label-smoothing 1.0 is out of range: allowed 0 <= eps_b < 1"),
    ("bonus_label_smoothing", -0.5, "--bonus-label-smoothing -0.5 is out of range"),
    ("label_smoothing", 1.0, "--label-smoothing 1.0 is out of range: allowed 0 <= eps < 1"),
    ("bonus_start", 1.0, "--bonus-start 1.0 is out of range: allowed 0 <= start < 1"),
    ("bonus_start", -0.2, "--bonus-start -0.2 is out of range"),
    ("ignore_prefix_size", -1, "--ignore-prefix-size -1 is out of range: allowed >= 0"),
])
def test_out_of_range_options_are_refused_with_one_line(option, value, message):
    with pytest.raises(EncouragingLossOptionError) as err:
        build("encouraging_loss", **{option: value})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_power_gamma_and_schedule_horizon_are_checked():
    with pytest.raises(EncouragingLossOptionError, match="--bonus-gamma 0.0 is out of range: allowed gamma >= 1"):
        build("encouraging_loss", bonus="power", bonus_gamma=0.0)
    with pytest.raises(EncouragingLossOptionError, match="--bonus-gamma 0.5 is out of range: allowed gamma >= 1"):
        build("encouraging_loss", bonus="power", bonus_gamma=0.5)
    with pytest.raises(EncouragingLossOptionError, match="--bonus-schedule-updates 0 is out of range"):
        build("encouraging_loss", bonus_schedule="linear")
    with pytest.raises(EncouragingLossOptionError, match="--bonus-schedule-exp-ratio 0.0"):
        build("encouraging_loss", bonus_schedule="exp", bonus_schedule_updates=10, bonus_schedule_exp_ratio=0.0)


@pytest.mark.parametrize("schedule,step,factor", [
    ("linear", 25, 0.25), ("linear", 400, 1.0),
    ("exp", 50, math.exp(-0.5 * 5)), ("cos", 50, 0.5), ("cos", 100, 1.0), ("constant", 3, 1.0),
])
def test_schedule_reads_fairseq_update_count(schedule, step, factor):
    criterion = build("encouraging_loss", bonus_rho=2.0, bonus_schedule=schedule, bonus_schedule_updates=100)
    with metrics.aggregate("train"):
        metrics.log_scalar("num_updates", step, weight=0)  # what Trainer.set_num_updates does
        assert math.isclose(criterion.current_spec().rho, 2.0 * factor, rel_tol=1e-12)


def test_ignore_prefix_size_drops_leading_tokens():
    sample = make_sample(4, 6, VOCAB, seed=7)
    sample["target"][:, :2] = torch.randint(4, VOCAB, (4, 2))  # no padding inside the prefix
    with_prefix = loss_and_grad(build("encouraging_loss", label_smoothing=0.1, ignore_prefix_size=2), sample)
    cut = {"net_input": {"src_tokens": sample["net_input"]["src_tokens"][:, 2:]},
           "target": sample["target"][:, 2:], "ntokens": sample["ntokens"]}
    without = loss_and_grad(build("encouraging_loss", label_smoothing=0.1), cut)
    assert torch.allclose(with_prefix[0], without[0])


def test_report_accuracy_and_diagnostics_are_logged():
    criterion = build("encouraging_loss", label_smoothing=0.1, report_accuracy=True)
    sample = make_sample(4, 6, VOCAB, seed=8)
    _, _, log, _ = loss_and_grad(criterion, sample)
    assert log["total"] == sample["ntokens"] and 0 <= log["n_correct"] <= log["total"]
    assert int(log["diag_tokens"]) == sample["ntokens"]
    with metrics.aggregate() as agg:
        type(criterion).reduce_metrics([log, log])
        values = agg.get_smoothed_values()
    n = sample["ntokens"]
    assert math.isclose(values["margin"], float(log["margin_sum"]) / n, abs_tol=1e-3)
    assert math.isclose(values["energy"], float(log["energy_sum"]) / n, abs_tol=1e-3)
    assert math.isclose(values["loss"], float(log["loss"]) / n / math.log(2), abs_tol=1e-3)
    assert "accuracy" in values and "well_classified_pct" in values and "p_y" in values


def test_diagnostics_on_hand_computed_logits():
    """Three target tokens with known energy, margin and p_y."""
    from el_fairseq.loss.diagnostics import summarize, token_stats_from_logits

    logits = torch.tensor([[0.0, 0.0, 9.0, 1.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 3.0], [0.0, 0.0, 5.0, 5.0]])
    target = torch.tensor([2, 2, 2, PAD])
    stats = token_stats_from_logits(logits, target, PAD)
    nll = logits.logsumexp(-1) - logits[torch.arange(4), target]
    sums = summarize(stats, nll, target, PAD)
    assert float(sums["energy_sum"]) == pytest.approx(-(9 + 2 + 1))
    assert float(sums["margin_sum"]) == pytest.approx(8 + 0 - 2)
    p = [math.exp(9) / (2 + math.exp(9) + math.e), math.exp(2) / (2 + 2 * math.exp(2)),
         math.e / (2 + math.e + math.exp(3))]
    assert float(sums["p_y_sum"]) == pytest.approx(sum(p), rel=1e-5)
    assert int(sums["well_classified"]) == 1 and int(sums["diag_tokens"]) == 3


def test_ls_ce_with_diagnostics_is_fairseq_ls_ce():
    sample = make_sample(5, 7, VOCAB, seed=4)
    ours = loss_and_grad(build("label_smoothed_cross_entropy_with_diagnostics", label_smoothing=0.1), sample)
    theirs = loss_and_grad(build("label_smoothed_cross_entropy", label_smoothing=0.1), sample)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    el = loss_and_grad(build("encouraging_loss", label_smoothing=0.1), sample)
    for key in ("margin_sum", "energy_sum", "p_y_sum", "well_classified", "diag_tokens"):
        assert torch.allclose(torch.as_tensor(ours[2][key]).double(), torch.as_tensor(el[2][key]).double(), rtol=1e-5)


@pytest.mark.parametrize("argv,on", [([], True), (["--log-diagnostics"], True), (["--no-log-diagnostics"], False)])
def test_diagnostics_flags_mean_what_they_say_through_fairseqs_parser(argv, on):
    """fairseq builds the flags from the dataclass: a bool field defaulting to True would become a
    store_false flag, so `--log-diagnostics` used to switch the diagnostics off."""
    import el_fairseq.criterions  # noqa: F401  (the plugin: registers the criteria)
    from fairseq import options
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["DATA", "--arch", "transformer", "--criterion", "encouraging_loss",
                                                "--label-smoothing", "0.1", *argv])
    cfg = convert_namespace_to_omegaconf(args)
    criterion = CRITERION_REGISTRY["encouraging_loss"].build_criterion(cfg.criterion, fairseq_task())
    assert criterion.log_diagnostics is on
    sample = make_sample(4, 6, VOCAB)
    log = loss_and_grad(criterion, sample)[2]
    assert ("margin_sum" in log) is on


def test_diagnostics_off_from_a_hydra_config_and_contradiction_refused():
    assert build("encouraging_loss", log_diagnostics=False).log_diagnostics is False
    with pytest.raises(EncouragingLossOptionError, match="--log-diagnostics and --no-log-diagnostics contradict"):
        build("encouraging_loss", log_diagnostics=True, no_log_diagnostics=True)


def fairseq_task():
    from fairseq_fixtures import TinyTask

    return TinyTask(VOCAB)


def test_smoothing_conventions_are_fairseqs_and_torchs():
    """benchmarks/smoothing_conventions.py (README: what differs from the authors' baseline) against
    fairseq's label_smoothed_nll_loss and torch's cross_entropy(label_smoothing=...)."""
    import torch.nn.functional as F
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

    from benchmarks.smoothing_conventions import conventions

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(30, 1000, generator=g, dtype=torch.float64) * 4
    target = torch.randint(0, 1000, (30,), generator=g)
    lprobs = torch.log_softmax(logits, -1)
    fairseq, authors = conventions(lprobs, target, 0.1)
    theirs = label_smoothed_nll_loss(lprobs, target.unsqueeze(-1), 0.1, reduce=False)[0].squeeze(-1)
    assert torch.allclose(fairseq, theirs, rtol=1e-12)
    assert torch.allclose(authors, F.cross_entropy(logits, target, label_smoothing=0.1, reduction="none"), rtol=1e-12)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    rest = -lprobs.sum(-1) - nll
    assert torch.allclose(authors - fairseq, 0.1 / 1000 * nll - 0.1 / (1000 * 999) * rest, rtol=1e-8, atol=1e-15)
