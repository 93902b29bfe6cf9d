"""CE vs the encouraging loss on a small classifier: scikit-learn's bundled digits (8x8 images,
10 classes, offline), an MLP, a few seeds, on the CPU in about a minute.

    python examples/digits.py [--seeds 1-5] [--epochs 40] [--log-end 0.75]

Prints test accuracy (mean ± std over seeds) and the margin statistics of the paper on the test
set (margin z_y - max_{j != y} z_j, p_y), per loss, and writes --json if asked.
The one line that changes: `criterion = EncouragingLoss()` instead of `nn.CrossEntropyLoss()`.
"""
import argparse
import json
import statistics
import time

import torch
from torch import nn

from el_fairseq import EncouragingLoss


def load(seed=0):
    """Train/test split of sklearn's digits (1,797 images), standardised with the train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std == 0] = 1.0  # pixels blank in every training image (a test image may still use them)
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return as_x(x_tr), torch.tensor(y_tr), as_x(x_te), torch.tensor(y_te)


def train(loss_name, seed, data, epochs, log_end, batch=64, lr=1e-3):
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = data
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))
    criterion = nn.CrossEntropyLoss() if loss_name == "CE" else EncouragingLoss(log_end=log_end)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y_tr), generator=g).split(batch):
            opt.zero_grad()
            criterion(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        z = model(x_te)
    z_y = z.gather(1, y_te[:, None])[:, 0]
    other = z.scatter(1, y_te[:, None], float("-inf")).max(1).values
    p_y = torch.softmax(z, 1).gather(1, y_te[:, None])[:, 0]
    return {"accuracy": float((z.argmax(1) == y_te).float().mean() * 100), "margin": float((z_y - other).mean()),
            "margin_q05": float((z_y - other).quantile(0.05)), "p_y": float(p_y.mean())}


def parse_seeds(text):
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi) + 1)) if hi else [int(s) for s in text.split(",")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1-5")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--log-end", type=float, default=0.75)
    parser.add_argument("--json", help="write the per-seed results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    data = load()
    results = {name: [train(name, s, data, args.epochs, args.log_end) for s in parse_seeds(args.seeds)]
               for name in ("CE", "EL")}
    print(f"digits: {len(data[1])} train / {len(data[3])} test images, MLP 64-128-10, {args.epochs} epochs, "
          f"seeds {args.seeds}, EL log_end {args.log_end}")
    print(f"{'loss':<4} {'test accuracy %':>18} {'mean margin':>14} {'5% margin':>12} {'mean p_y':>10}")
    for name, runs in results.items():
        acc = [r["accuracy"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"{name:<4} {statistics.fmean(acc):>10.2f} ± {sd:<5.2f} "
              f"{statistics.fmean(r['margin'] for r in runs):>14.2f} {statistics.fmean(r['margin_q05'] for r in runs):>12.2f} "
              f"{statistics.fmean(r['p_y'] for r in runs):>10.3f}")
    print(f"({time.time() - start:.0f} s, torch {torch.__version__}, 1 thread)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
