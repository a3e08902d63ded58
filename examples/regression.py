"""Regression: an MLP on scikit-learn's diabetes data, trained with and without T1.

The regulariser sees the hidden ReLU layers and the (one-unit) output layer;
with a one-unit output the pooled point cloud is simply the hidden neurons
plus the prediction. Both runs start from the same weights and see the same
batches; the script prints the test mean squared error (in units of the
target's variance, so 1.0 = predicting the mean), the mean MST death of the
hidden neurons, and the time per epoch.

Run: ``python examples/regression.py [--epochs N] [--weight LAMBDA] [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from torch import nn

import topodecorr as td


def load(seed: int = 0):
    X, y = load_diabetes(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=seed)
    mx, sx, my, sy = Xtr.mean(0), Xtr.std(0), ytr.mean(), ytr.std()
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f((Xtr - mx) / sx), f((ytr - my) / sy)[:, None], f((Xte - mx) / sx), f((yte - my) / sy)[:, None]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))


def hidden_mean_death(model, X) -> float:
    with torch.no_grad():
        h1 = model[1](model[0](X))
        h2 = model[3](model[2](h1))
        return float(td.correlation_deaths(torch.cat([h1, h2], 1)).deaths.mean())


def train(penalty: str | None, weight: float, epochs: int, seed: int = 0, batch: int = 64) -> dict:
    Xtr, ytr, Xte, yte = load(seed)
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    reg_ctx = td.Decorrelation(model, penalty=penalty, weight=weight) if penalty else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with reg_ctx as reg:
        for _ in range(epochs):
            perm = torch.randperm(len(Xtr), generator=gen)
            for s in range(0, len(Xtr) - batch + 1, batch):
                idx = perm[s : s + batch]
                opt.zero_grad()
                loss = F.mse_loss(model(Xtr[idx]), ytr[idx])
                if reg is not None:
                    loss = loss + reg.penalty()
                loss.backward()
                opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        mse = float(F.mse_loss(model(Xte), yte))
    return {"test_mse": mse, "mean_death": hidden_mean_death(model, Xte), "s_per_epoch": seconds / max(epochs, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--weight", type=float, default=1e-2)
    ap.add_argument("--penalty", default="t1", choices=["t1", "t2", "mean_abs_corr", "decov"])
    ap.add_argument("--quick", action="store_true", help="two epochs (a smoke run)")
    args = ap.parse_args(argv)
    epochs = 2 if args.quick else args.epochs
    results = {
        "plain": train(None, 0.0, epochs),
        args.penalty: train(args.penalty, args.weight, epochs),
    }
    print(f"diabetes MLP 10-64-32-1, {epochs} epochs, weight {args.weight:g} (MSE in target variances)")
    print(f"{'run':>14} {'test MSE':>9} {'mean death':>11} {'s/epoch':>8}")
    for name, r in results.items():
        print(f"{name:>14} {r['test_mse']:9.4f} {r['mean_death']:11.4f} {r['s_per_epoch']:8.3f}")
    return results


if __name__ == "__main__":
    main()
