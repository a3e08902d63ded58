"""Classification: an MLP on scikit-learn's digits, trained with and without T1.

The three lines that add the paper's regulariser to an ordinary training loop::

    with topodecorr.Decorrelation(model, penalty="t1", weight=1e-3) as reg:
        ...
        loss = F.cross_entropy(model(x), y) + reg.penalty()

Both runs start from the same weights and see the same batches; the script
prints test accuracy, the mean MST death of the neurons (higher = less
redundant) and the time per epoch.

Run: ``python examples/classification.py [--epochs N] [--weight LAMBDA] [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import topodecorr as td


def load(seed: int = 0):
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(Xtr), torch.tensor(ytr), f(Xte), torch.tensor(yte)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def mean_death(model, X) -> float:
    """Mean MST death of all neurons on the data X (no gradient)."""
    with torch.no_grad():
        h1 = model[1](model[0](X))
        h2 = model[3](model[2](h1))
        acts = torch.cat([h1, h2, model[4](h2)], dim=1)
        return float(td.correlation_deaths(acts).deaths.mean())


def train(penalty: str | None, weight: float, epochs: int, seed: int = 0, batch: int = 128) -> dict:
    Xtr, ytr, Xte, yte = load(seed)
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    reg_ctx = td.Decorrelation(model, penalty=penalty, weight=weight) if penalty else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with reg_ctx as reg:
        for _ in range(epochs):
            perm = torch.randperm(len(Xtr), generator=gen)
            for s in range(0, len(Xtr) - batch + 1, batch):  # drop the last partial batch
                idx = perm[s : s + batch]
                opt.zero_grad()
                loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
                if reg is not None:
                    loss = loss + reg.penalty()
                loss.backward()
                opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        acc = float((model(Xte).argmax(1) == yte).float().mean())
    return {"accuracy": acc, "mean_death": mean_death(model, Xte), "s_per_epoch": seconds / max(epochs, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--weight", type=float, default=1e-2)
    ap.add_argument("--penalty", default="t1", choices=["t1", "t2", "mean_abs_corr", "decov"])
    ap.add_argument("--quick", action="store_true", help="a few epochs (a smoke run)")
    args = ap.parse_args(argv)
    epochs = 5 if args.quick else args.epochs
    results = {
        "plain": train(None, 0.0, epochs),
        args.penalty: train(args.penalty, args.weight, epochs),
    }
    print(f"digits MLP 64-128-64-10, {epochs} epochs, weight {args.weight:g}")
    print(f"{'run':>14} {'test acc':>9} {'mean death':>11} {'s/epoch':>8}")
    for name, r in results.items():
        print(f"{name:>14} {r['accuracy']:9.4f} {r['mean_death']:11.4f} {r['s_per_epoch']:8.3f}")
    return results


if __name__ == "__main__":
    main()
