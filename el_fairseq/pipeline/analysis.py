"""Teacher-forced margin/energy/p_y analysis of fairseq checkpoints (the paper's diagnostics).

For every non-padding target token of a subset: energy -z_y, margin z_y - max_{j!=y} z_j, p_y.
Writes OUT/margins.json (mean and quantiles per checkpoint) and PNG histograms overlaying them.
"""
import json
import os

import numpy as np
import torch

from ..loss.diagnostics import WELL_CLASSIFIED_P, token_stats_from_logits

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def parse_paths(spec):
    """'a.pt:CE,b.pt:EL' -> [('a.pt', 'CE'), ('b.pt', 'EL')]; the label defaults to the file name."""
    out = []
    for item in spec.split(","):
        path, _, label = item.partition(":")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--path: no such checkpoint {path}")
        out.append((path, label or os.path.basename(path)))
    return out


@torch.no_grad()
def token_statistics(checkpoint, data, subset="test", max_tokens=4096, cpu=None):
    """Arrays of energy, margin and p_y over the subset's target tokens (teacher forcing)."""
    from fairseq import checkpoint_utils

    from .. import compat

    compat.apply()  # torch >= 2.6 loading of fairseq checkpoints (el_fairseq.safe_loading)
    use_cuda = torch.cuda.is_available() and not cpu
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides={"data": data})
    model = models[0].eval()
    if use_cuda:
        model = model.cuda()
    task.load_dataset(subset)
    itr = task.get_batch_iterator(dataset=task.dataset(subset), max_tokens=max_tokens,
                                  max_positions=None, ignore_invalid_inputs=True).next_epoch_itr(shuffle=False)
    pad = task.target_dictionary.pad()
    energy, margin, p_y = [], [], []
    for sample in itr:
        if use_cuda:
            from fairseq import utils

            sample = utils.move_to_cuda(sample)
        logits = model(**sample["net_input"])[0].float()
        target = sample["target"]
        keep = target.ne(pad).reshape(-1)
        stats = token_stats_from_logits(logits, target, pad)[keep]
        lprobs = torch.log_softmax(logits, -1).reshape(-1, logits.size(-1))[keep]
        p = lprobs.gather(-1, target.reshape(-1)[keep].unsqueeze(-1)).squeeze(-1).exp()
        energy.append(-stats[:, 0].cpu())
        margin.append(stats[:, 1].cpu())
        p_y.append(p.cpu())
    return {"energy": torch.cat(energy).numpy(), "margin": torch.cat(margin).numpy(), "p_y": torch.cat(p_y).numpy()}


def summarize_arrays(arrays):
    out = {"tokens": int(len(arrays["p_y"])),
           "well_classified_pct": float(100.0 * np.mean(arrays["p_y"] > WELL_CLASSIFIED_P))}
    for name, values in arrays.items():
        out[name] = {"mean": float(np.mean(values)),
                     **{f"q{int(q * 100):02d}": float(np.quantile(values, q)) for q in QUANTILES}}
    return out


def plot_histograms(per_label, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, xlabel in (("margin", "margin z_y - max_{j!=y} z_j"), ("energy", "energy -z_y"), ("p_y", "p_y")):
        fig, ax = plt.subplots(figsize=(6, 4))
        values = [arrays[name] for arrays in per_label.values()]
        lo = min(float(v.min()) for v in values)
        hi = max(float(v.max()) for v in values)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
        for label, arrays in per_label.items():
            ax.hist(arrays[name], bins=bins, alpha=0.5, label=f"{label} (mean {np.mean(arrays[name]):.2f})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("target tokens")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, f"{name}_hist.png")
        fig.savefig(path + ".tmp.png", dpi=110)
        plt.close(fig)
        os.replace(path + ".tmp.png", path)
        written.append(path)
    return written


def analyze(paths, data, subset, out_dir, cpu=None):
    os.makedirs(out_dir, exist_ok=True)
    per_label = {label: token_statistics(path, data, subset, cpu=cpu) for path, label in paths}
    result = {"subset": subset, "data": data,
              "checkpoints": {label: {"path": path, **summarize_arrays(per_label[label])} for path, label in paths}}
    json_path = os.path.join(out_dir, "margins.json")
    with open(json_path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(json_path + ".tmp", json_path)
    return result, plot_histograms(per_label, out_dir)
