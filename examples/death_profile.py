"""Train a small MLP on scikit-learn's digits for a few seconds, with and without T1,
and print the profile of its MST deaths (the zero-dimensional persistence of its neurons).

Run: python examples/death_profile.py
"""

from __future__ import annotations

import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import topodecorr as td


def train(weight: float, seconds: float = 4.0, seed: int = 0):
    torch.manual_seed(seed)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    model = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 60), nn.ReLU(), nn.Linear(60, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        idx = torch.randint(0, len(X), (256,))
        h1 = model[1](model[0](X[idx]))
        h2 = model[3](model[2](h1))
        out = model[4](h2)
        loss = nn.functional.cross_entropy(out, y[idx])
        if weight > 0:
            deaths = td.correlation_deaths(torch.cat([h1, h2, out], dim=1)).deaths
            loss = loss + weight * td.t1(deaths)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        h1 = model[1](model[0](X))
        h2 = model[3](model[2](h1))
        out = model[4](h2)
        acc = (out.argmax(1) == y).float().mean().item()
        deaths = td.correlation_deaths(torch.cat([h1, h2, out], dim=1)).deaths
    return acc, deaths


def main():
    for weight in (0.0, 1e-2):
        acc, d = train(weight)
        q = torch.quantile(d, torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]))
        label = "no regulariser" if weight == 0 else f"T1, weight {weight:g}"
        print(f"{label:>18}: train accuracy {acc:.3f}, {len(d)} deaths, zero deaths {(d <= 1e-6).sum().item()}")
        print("    death quantiles (0, .1, .25, .5, .75, .9, 1):", " ".join(f"{v:.3f}" for v in q.tolist()))
        hist = torch.histc(d, bins=10, min=0.0, max=1.0).long().tolist()
        print("    histogram over [0, 1] in tenths:", hist)


if __name__ == "__main__":
    main()
