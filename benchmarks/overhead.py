"""Training overhead of the drop-in regulariser, and the accuracy of ``refresh_every``.

Run on demand (not part of the test suite)::

    .venv/bin/python benchmarks/overhead.py            # full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/overhead.py --quick    # fewer repeats (a smoke run)

Step time. One training step = forward, loss, backward, SGD update (Nesterov
momentum 0.9, lr 0.01), with ``topodecorr.Decorrelation`` hooked into that
same forward pass, or without it ("plain"). All variants of one model live in
one process and are timed **interleaved** (plain, T1, T2, ... round-robin),
so the background load of a shared machine hits them alike; each variant owns
its own copy of the model and optimiser. We report the median step time and
the ratio of medians to the plain step.

* (a) the paper's MLP 784-450-350-200-10 (ReLU), synthetic inputs, batch 256,
  all 1010 neurons (sampling "all"): T1, T2, mean |corr| (the naive baseline),
  T1 with ``refresh_every=10``, and the "none" control (capture only);
* (b) a VGG-style CNN on 32x32x3 inputs (conv 32-32-pool-64-64-pool-128-pool,
  dense 256, 10 logits; flattened conv maps are neurons) with importance
  sampling p = 0.005, same penalties.

refresh_every accuracy. A short training run of the paper's MLP shape on
scikit-learn's digits (64 inputs, 64-450-350-200-10, batch 256, T1 with
weight 1e-3, ``refresh_every=10``). At every step we also compute the exact
deaths (a fresh MST of the same activations) and compare: the relative error
of the sum of deaths (the quantity T1 depends on), and the largest absolute
difference between the sorted death vectors. The tree's weight can only be
>= the exact MST weight, so the error is one-sided.

Results: ``benchmarks/out/overhead.{json,csv,md}``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Timer, markdown_table, write_results  # noqa: E402

import topodecorr  # noqa: E402


def paper_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(784, 450), nn.ReLU(), nn.Linear(450, 350), nn.ReLU(),
        nn.Linear(350, 200), nn.ReLU(), nn.Linear(200, 10),
    )


def vgg_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10),
    )


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reg_kwargs: dict | None):
    """A closure doing one training step; ``reg_kwargs=None`` is the plain step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    reg = topodecorr.Decorrelation(model, **reg_kwargs).attach() if reg_kwargs is not None else None
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y)
        if reg is not None:
            loss = loss + reg.penalty()
        loss.backward()
        opt.step()

    return step


def time_model(label, build, x, y, variants, timer):
    torch.manual_seed(0)
    base = build()
    fns = {}
    for name, kw in variants.items():
        fns[name] = make_step(copy.deepcopy(base), x, y, kw)
    rows = timer.measure_many(fns, model=label, batch=x.shape[0])
    plain = next(r["median_ms"] for r in rows if r["name"] == "plain")
    for r in rows:
        r["ratio"] = r["median_ms"] / plain
    return rows


def refresh_accuracy(steps: int, refresh_every: int, weight: float = 1e-3):
    """Train with refresh_every and compare each step's deaths with the exact ones."""
    from sklearn.datasets import load_digits

    X, Y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    Y = torch.tensor(Y)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 450), nn.ReLU(), nn.Linear(450, 350), nn.ReLU(),
        nn.Linear(350, 200), nn.ReLU(), nn.Linear(200, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    reg = topodecorr.Decorrelation(model, penalty="t1", weight=weight, refresh_every=refresh_every)
    g = torch.Generator().manual_seed(1)
    rel, maxabs, same_tree = [], [], []
    with reg:
        for s in range(steps):
            idx = torch.randint(0, len(X), (256,), generator=g)
            opt.zero_grad()
            out = model(X[idx])
            acts = [a.detach() for a in reg.captured_activations()]
            loss = nn.functional.cross_entropy(out, Y[idx]) + reg.penalty()
            loss.backward()
            opt.step()
            approx = reg.last_deaths
            exact = topodecorr.decorrelation_result(acts, "t1").deaths[0]
            a_sum, e_sum = float(approx.sum()), float(exact.sum())
            rel.append((a_sum - e_sum) / e_sum)
            maxabs.append(float((approx.sort().values - exact.sort().values).abs().max()))
            same_tree.append(a_sum == e_sum)
    between = [r for i, r in enumerate(rel) if i % refresh_every != 0]
    return {
        "steps": steps,
        "refresh_every": refresh_every,
        "rel_err_sum_median": statistics.median(between),
        "rel_err_sum_max": max(between),
        "rel_err_sum_min": min(between),
        "max_abs_death_diff_median": statistics.median(
            [m for i, m in enumerate(maxabs) if i % refresh_every != 0]
        ),
        "max_abs_death_diff_max": max(maxabs),
        "refresh_steps_exact": all(same_tree[i] or abs(rel[i]) < 1e-6 for i in range(0, steps, refresh_every)),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    ap.add_argument("--skip-cnn", action="store_true")
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: on a loaded shared machine, OpenMP regions of 2+ threads stall)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps_mlp, reps_cnn, acc_steps = (15, 3, 40) if args.quick else (60, 12, 300)

    rows = []
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 784, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    mlp_variants = {
        "plain": None,
        "none (capture only)": dict(penalty="none"),
        "t1": dict(penalty="t1"),
        "t2": dict(penalty="t2"),
        "mean_abs_corr": dict(penalty="mean_abs_corr"),
        "t1 refresh_every=10": dict(penalty="t1", refresh_every=10),
    }
    rows += time_model("mlp-784-450-350-200-10", paper_mlp, x, y, mlp_variants, Timer(repeats=reps_mlp, warmup=5))
    if not args.skip_cnn:
        xc = torch.rand(128, 3, 32, 32, generator=g)
        yc = torch.randint(0, 10, (128,), generator=g)
        imp = dict(sampling="importance", fraction=0.005)
        cnn_variants = {
            "plain": None,
            "t1": dict(penalty="t1", **imp),
            "t2": dict(penalty="t2", **imp),
            "mean_abs_corr": dict(penalty="mean_abs_corr", **imp),
            "t1 refresh_every=10": dict(penalty="t1", refresh_every=10, **imp),
        }
        rows += time_model("vgg-cnn-32x32x3", vgg_cnn, xc, yc, cnn_variants, Timer(repeats=reps_cnn, warmup=2))

    acc = refresh_accuracy(acc_steps, 10)
    md = "# Training overhead\n\n" + markdown_table(
        rows, ["model", "name", "batch", "median_ms", "min_ms", "ratio", "repeats"]
    )
    md += "\n\n## refresh_every=10 vs exact trees (digits MLP, T1)\n\n"
    md += "\n".join(f"- {k}: {v:.3g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in acc.items()) + "\n"
    settings = dict(threads=torch.get_num_threads(), torch=torch.__version__, quick=args.quick)
    write_results("overhead", rows, settings=settings, extra={"refresh_accuracy": acc}, markdown=md)
    print(md)


if __name__ == "__main__":
    main()
