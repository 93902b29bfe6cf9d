"""How much the two label-smoothing conventions differ, on a trained model's validation logits.

fairseq 0.12's LS-CE (our CE part):  (1 - eps - eps/(V-1)) * nll + eps/(V-1) * sum_j -log p_j
the authors' fork (and torch's):     (1 - eps) * nll + eps/V * sum_j -log p_j
Their difference per token (authors - fairseq) is eps/V * nll - eps/(V(V-1)) * sum_{j != y} -log p_j;
the gradients differ by eps/V at the target and eps/(V(V-1)) elsewhere.

    python -m benchmarks.smoothing_conventions CHECKPOINT DATA_BIN [--subset valid] [--eps 0.1]
"""
import argparse
import json

import torch


def conventions(lprobs, target, eps):
    """Per-token losses (fairseq, authors) for log-probabilities (N, V) and targets (N,)."""
    vocab = lprobs.size(-1)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth = -lprobs.sum(-1)
    fairseq = (1 - eps - eps / (vocab - 1)) * nll + eps / (vocab - 1) * smooth
    authors = (1 - eps) * nll + eps / vocab * smooth
    return fairseq, authors


@torch.no_grad()
def measure(checkpoint, data, subset="valid", eps=0.1, max_tokens=4096):
    from fairseq import checkpoint_utils

    import el_fairseq.criterions  # noqa: F401  (the plugin: torch >= 2.6 checkpoint loading)

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides={"data": data})
    model = models[0].eval()
    task.load_dataset(subset)
    itr = task.get_batch_iterator(dataset=task.dataset(subset), max_tokens=max_tokens,
                                  ignore_invalid_inputs=True).next_epoch_itr(shuffle=False)
    pad = task.target_dictionary.pad()
    f_sum = a_sum = gap_abs = gap_max = 0.0
    tokens = 0
    for sample in itr:
        logits = model(**sample["net_input"])[0].double()
        target = sample["target"].reshape(-1)
        keep = target.ne(pad)
        lprobs = torch.log_softmax(logits, -1).reshape(-1, logits.size(-1))[keep]
        f, a = conventions(lprobs, target[keep], eps)
        f_sum += float(f.sum())
        a_sum += float(a.sum())
        gap_abs += float((a - f).abs().sum())
        gap_max = max(gap_max, float((a - f).abs().max()))
        tokens += int(keep.sum())
    vocab = len(task.target_dictionary)
    return {"checkpoint": checkpoint, "subset": subset, "eps": eps, "vocab": vocab, "tokens": tokens,
            "loss_fairseq_nats": f_sum / tokens, "loss_authors_nats": a_sum / tokens,
            "mean_abs_difference_nats": gap_abs / tokens, "max_abs_difference_nats": gap_max,
            "relative_difference": (a_sum - f_sum) / f_sum,
            "gradient_difference": {"target": eps / vocab, "others": eps / (vocab * (vocab - 1))}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("data")
    parser.add_argument("--subset", default="valid")
    parser.add_argument("--eps", type=float, default=0.1)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.checkpoint, args.data, args.subset, args.eps), indent=1))


if __name__ == "__main__":
    main()
