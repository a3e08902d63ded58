"""Regression: an MLP on scikit-learn's diabetes data, trained with and without T2.

The regressor's single output is the output layer (kept whole); the hidden
ReLU layers are regularised. Run: ``python examples/regression.py``
(seconds on a CPU) or ``--quick``. Prints the test mean squared error
(standardised target) and the mean MST death on the test set.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from torch import nn

import topodecorr


def train(penalty: str, weight: float, epochs: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    X, y = load_diabetes(return_X_y=True)
    y = (y - y.mean()) / y.std()
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0)
    mu, sd = Xtr.mean(0), Xtr.std(0)
    f = lambda a: torch.tensor((a - mu) / sd, dtype=torch.float32)  # noqa: E731
    Xtr, Xte = f(Xtr), f(Xte)
    ytr, yte = torch.tensor(ytr, dtype=torch.float32), torch.tensor(yte, dtype=torch.float32)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with topodecorr.Decorrelation(model, penalty=penalty, weight=weight) as reg:
        for _ in range(epochs):
            perm = torch.randperm(len(Xtr))
            for i in range(0, len(Xtr) - 63, 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                pred = model(Xtr[idx]).squeeze(1)
                loss = nn.functional.mse_loss(pred, ytr[idx]) + reg.penalty()
                loss.backward()
                opt.step()
    model.eval()
    with torch.no_grad():
        h1 = model[1](model[0](Xte))
        h2 = model[3](model[2](h1))
        mse = nn.functional.mse_loss(model[4](h2).squeeze(1), yte).item()
        deaths = topodecorr.decorrelation_result([h1, h2], "t1", output_layers=[False, False]).deaths[0]
    return {"mse": mse, "mean_death": deaths.mean().item(), "last_stats": reg.last_stats}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="MLP regression on diabetes with and without T2")
    ap.add_argument("--quick", action="store_true", help="3 epochs (smoke run)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--weight", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (small models train fastest on one; default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs = 3 if args.quick else args.epochs
    results = {"plain": train("none", 0.0, epochs), "t2": train("t2", args.weight, epochs)}
    for name, r in results.items():
        print(f"{name:6s} test MSE {r['mse']:.3f}   mean death {r['mean_death']:.3f}")
    return results


if __name__ == "__main__":
    main()
