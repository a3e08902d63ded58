"""Classification: an MLP on scikit-learn's digits, trained with and without T1.

Adding the regulariser to an existing loop takes three lines::

    reg = topodecorr.Decorrelation(model, penalty="t1", weight=1e-3)
    with reg:
        ...  loss = task_loss + reg.penalty()

Run: ``python examples/classification.py`` (about half a minute on a CPU), or
``--quick`` for a few-second smoke run. Prints test accuracy and the mean MST
death of the trained network's neurons on the test set (higher = less
redundant neurons) for each run.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import topodecorr


def layer_outputs(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs after each nonlinearity plus the logits (the neurons the regulariser sees)."""
    outs = []
    for m in model:
        x = m(x)
        if isinstance(m, nn.ReLU):
            outs.append(x)
    return outs + [x]


def train(penalty: str, weight: float, epochs: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.25, random_state=0, stratify=y)
    Xtr, Xte = torch.tensor(Xtr, dtype=torch.float32), torch.tensor(Xte, dtype=torch.float32)
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    reg = topodecorr.Decorrelation(model, penalty=penalty, weight=weight)
    with reg:
        for _ in range(epochs):
            perm = torch.randperm(len(Xtr))
            for i in range(0, len(Xtr) - 63, 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]) + reg.penalty()
                loss.backward()
                opt.step()
    model.eval()
    with torch.no_grad():
        acts = layer_outputs(model, Xte)
        acc = (acts[-1].argmax(1) == yte).float().mean().item()
        deaths = topodecorr.decorrelation_result(acts, "t1").deaths[0]
    return {"accuracy": acc, "mean_death": deaths.mean().item(), "last_stats": reg.last_stats}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="MLP on digits with and without T1")
    ap.add_argument("--quick", action="store_true", help="5 epochs (smoke run)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--weight", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (small models train fastest on one; default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs = 5 if args.quick else args.epochs
    results = {"plain": train("none", 0.0, epochs), "t1": train("t1", args.weight, epochs)}
    for name, r in results.items():
        print(f"{name:6s} test accuracy {r['accuracy']:.3f}   mean death {r['mean_death']:.3f}")
    return results


if __name__ == "__main__":
    main()
