"""Row subsampling (``max_samples``): how close the deaths stay to the full-sample ones, and the time saved.

One 64-channel map of a ResNet-like stem (conv 3 -> 64, BN, ReLU, conv 64 -> 64,
BN, ReLU; random weights, seeded) on a batch of smooth random 32 x 32 images,
read in channel mode: B x H x W = 64 x 32 x 32 = 65,536 rows, 64 neurons. For
each ``max_samples`` the T1 pipeline (:func:`topodecorr.decorrelation_result`)
runs on ``draws`` independent row draws; against the full-sample deaths
(sorted, compared rank by rank) it reports the median and 90th percentile of
|death error|, the T1 relative error, the share of tree edges shared with
the full-sample MST, and the step time (forward + backward of the penalty
through the map, median of interleaved repeats, one thread).

Writes ``benchmarks/out/subsampling.json`` and ``.md`` (not in the repository;
BENCHMARKS.md "Row subsampling" summarises a run).

    python benchmarks/subsampling.py [--quick] [--threads 1] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import topodecorr as td
from topodecorr.functional import flatten_activation

ROWS = (256, 512, 1024, 2048, 4096, 8192, 16384)


def feature_map(batch: int = 64, size: int = 32, channels: int = 64, seed: int = 0) -> torch.Tensor:
    """A (batch, channels, size, size) post-ReLU map of a random ResNet-like stem on smooth images."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    x = nn.functional.avg_pool2d(x, 5, stride=1, padding=2)  # spatially smooth inputs, like images
    stem = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
    )
    with torch.no_grad():
        return stem(x)


def _edges(r) -> set:
    e = r.edges[0].tolist()
    return {tuple(sorted(p)) for p in e}


def _step_seconds(acts: torch.Tensor, max_samples: int | None, repeats: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(repeats):
        a = acts.detach().requires_grad_(True)
        t0 = time.perf_counter()
        p = td.decorrelation_penalty([a], "t1", max_samples=max_samples, generator=gen)
        p.backward()
        times.append(time.perf_counter() - t0)
    return times


def run(rows=ROWS, draws: int = 5, repeats: int = 7, seed: int = 0) -> dict:
    fmap = feature_map(seed=seed)
    acts = flatten_activation(fmap, "channel")  # (65536, 64)
    full = td.decorrelation_result([acts], "t1")
    d_full = full.deaths[0]
    t1_full = float(full.value)
    tree_full = _edges(full)
    results = []
    for m in rows:
        errs, rel, shared = [], [], []
        for k in range(draws):
            r = td.decorrelation_result([acts], "t1", max_samples=m, generator=torch.Generator().manual_seed(1000 + k))
            errs.append((r.deaths[0] - d_full).abs())
            rel.append(abs(float(r.value) - t1_full) / t1_full)
            shared.append(len(_edges(r) & tree_full) / len(tree_full))
        e = torch.cat(errs)
        results.append(dict(
            max_samples=m,
            median_abs_death_error=float(e.median()),
            p90_abs_death_error=float(e.quantile(0.9)),
            t1_relative_error=statistics.median(rel),
            shared_tree_edges=statistics.median(shared),
        ))
    # timing: all settings interleaved, one repeat each per round
    settings = [None, *rows]
    times = {m: [] for m in settings}
    for _ in range(1):  # warm-up round
        for m in settings:
            _step_seconds(acts, m, 1, seed)
    for _ in range(repeats):
        for m in settings:
            times[m] += _step_seconds(acts, m, 1, seed)
    full_ms = 1e3 * statistics.median(times[None])
    for row in results:
        row["step_ms"] = 1e3 * statistics.median(times[row["max_samples"]])
        row["speedup"] = full_ms / row["step_ms"]
    return dict(
        rows=acts.shape[0], neurons=acts.shape[1], draws=draws, repeats=repeats, threads=torch.get_num_threads(),
        full=dict(t1=t1_full, mean_death=float(d_full.mean()), step_ms=full_ms), results=results,
    )


def markdown(res: dict) -> str:
    lines = [
        f"rows {res['rows']:,}, neurons {res['neurons']}, {res['draws']} draws per setting, "
        f"{res['threads']} thread(s); full sample: T1 = {res['full']['t1']:.3f}, mean death "
        f"{res['full']['mean_death']:.4f}, step {res['full']['step_ms']:.1f} ms",
        "",
        "| max_samples | median abs death error | p90 | T1 rel. error | tree edges shared | step ms | speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["results"]:
        lines.append(
            f"| {r['max_samples']:,} | {r['median_abs_death_error']:.4f} | {r['p90_abs_death_error']:.4f} | "
            f"{100 * r['t1_relative_error']:.2f}% | {100 * r['shared_tree_edges']:.0f}% | {r['step_ms']:.1f} | "
            f"{r['speedup']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two draws, three repeats, fewer settings")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        res = run(rows=(256, 2048, 16384), draws=2, repeats=3)
    else:
        res = run()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "subsampling.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (args.out / "subsampling.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
