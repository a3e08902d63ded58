"""Generation: a small autoencoder on scikit-learn's digits, with and without T1 on its code.

Only the bottleneck (the code layer, after its nonlinearity) is regularised,
chosen by name pattern: decorrelated code units. Run:
``python examples/autoencoder.py`` (seconds on a CPU) or ``--quick``. Prints
the test reconstruction error and the mean MST death of the code units;
``--samples out.png`` also saves decoded images of random codes.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import topodecorr


class AutoEncoder(nn.Module):
    def __init__(self, code: int = 12):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, code), nn.Tanh())
        self.decoder = nn.Sequential(nn.Linear(code, 48), nn.ReLU(), nn.Linear(48, 64), nn.Sigmoid())

    def forward(self, x):
        return self.decoder(self.encoder(x))


def train(penalty: str, weight: float, epochs: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    X, _ = load_digits(return_X_y=True)
    Xtr, Xte = train_test_split(X / 16.0, test_size=0.25, random_state=0)
    Xtr, Xte = torch.tensor(Xtr, dtype=torch.float32), torch.tensor(Xte, dtype=torch.float32)
    model = AutoEncoder()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    # the code layer only (its Tanh), no output layer
    with topodecorr.Decorrelation(model, layers=["encoder.3"], penalty=penalty, weight=weight) as reg:
        for _ in range(epochs):
            perm = torch.randperm(len(Xtr))
            for i in range(0, len(Xtr) - 127, 128):
                x = Xtr[perm[i : i + 128]]
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), x) + reg.penalty()
                loss.backward()
                opt.step()
    model.eval()
    with torch.no_grad():
        code = model.encoder(Xte)
        err = nn.functional.mse_loss(model.decoder(code), Xte).item()
        deaths = topodecorr.decorrelation_result([code], "t1", output_layers=[False]).deaths[0]
    return {"mse": err, "mean_death": deaths.mean().item(), "model": model, "last_stats": reg.last_stats}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="autoencoder on digits with and without T1 on its code")
    ap.add_argument("--quick", action="store_true", help="3 epochs (smoke run)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--weight", type=float, default=1e-2)
    ap.add_argument("--samples", help="save decoded random codes to this PNG (needs matplotlib)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (small models train fastest on one; default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs = 3 if args.quick else args.epochs
    results = {"plain": train("none", 0.0, epochs), "t1": train("t1", args.weight, epochs)}
    for name, r in results.items():
        print(f"{name:6s} test reconstruction MSE {r['mse']:.4f}   code mean death {r['mean_death']:.3f}")
    if args.samples:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 8, figsize=(8, 2.2))
        g = torch.Generator().manual_seed(0)
        for row, (name, r) in zip(axes, results.items()):
            with torch.no_grad():
                imgs = r["model"].decoder(torch.rand(8, 12, generator=g) * 2 - 1).reshape(-1, 8, 8)
            for ax, im in zip(row, imgs):
                ax.imshow(im, cmap="gray_r")
                ax.axis("off")
            row[0].set_title(name, fontsize=8, loc="left")
        fig.savefig(args.samples, dpi=100)
    return results


if __name__ == "__main__":
    main()
