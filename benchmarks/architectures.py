"""Regularised vs plain training steps on the architectures people train (issue 9.8).

Run on demand (not part of the test suite)::

    python benchmarks/architectures.py                  # CPU, 1 and 2 threads
    python benchmarks/architectures.py --quick          # fewer repeats (a smoke run)
    python benchmarks/architectures.py --device cuda    # the same on a GPU, plus tree timings

Models (synthetic inputs; each variant owns its copy of the model and optimiser;
plain and regularised steps are timed **interleaved in one process**, medians):

* ``mlp``: the paper's MLP 784-450-350-200-10, batch 256, T1 over all 1010
  neurons in one pooled cloud (``layers="auto"``);
* ``resnet18``: torchvision ``resnet18(num_classes=10)`` at 32x32, batch 32,
  T1 on every channel, one tree per ReLU call (17 clouds, ``mode="channel"``,
  ``pooled=False``);
* ``gpt``: a GPT-2-style stack, 6 pre-norm causal blocks
  (``nn.TransformerEncoderLayer``, d = 384, 6 heads, FFN 1536 with a GELU
  module), batch 8 x 128 tokens, T1 per block over the FFN units
  (``layers="auto"``: 6 clouds of 1024 samples x 1536 neurons);
* ``resnet18-1024rows`` and ``gpt-256rows``: the same with row subsampling
  (``max_samples``: at most 1024 of each channel cloud's B*H*W rows, 256 of each
  block's 1024 token rows, drawn afresh every step);
* on CUDA also ``gpt2-small`` (12 blocks, d = 768, FFN 3072, 8 x 128 tokens) and the
  deaths of single trees at n = 4096 and 16384 (``correlation_deaths``, B = 256).

A step is zero_grad, forward, loss (+ penalty), backward, SGD update; each
phase is timed separately (with a device sync on CUDA) so the table says where
the extra time goes: the penalty's forward (correlations, trees, deaths) and
its share of the backward.

Raw results: ``benchmarks/out/architectures.{json,csv,md}`` (gitignored).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import markdown_table, write_results  # noqa: E402

import topodecorr  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def paper_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 450), nn.ReLU(), nn.Linear(450, 350), nn.ReLU(),
        nn.Linear(350, 200), nn.ReLU(), nn.Linear(200, 10),
    )


class GPTStack(nn.Module):
    """Token embeddings, ``blocks`` causal pre-norm transformer blocks, an LM head."""

    def __init__(self, vocab=256, context=128, d=384, heads=6, blocks=6):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation=nn.GELU(),
                                       batch_first=True, norm_first=True)
            for _ in range(blocks)
        )
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids):
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        for b in self.blocks:
            x = b(x, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(x)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model, x, y, reg_kwargs, device, phases):
    """One training step; ``reg_kwargs=None`` is the plain step. Appends phase times to ``phases``."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    reg = topodecorr.Decorrelation(model, **reg_kwargs).attach() if reg_kwargs is not None else None

    def step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        _sync(device)
        t1 = time.perf_counter()
        if reg is not None:
            loss = loss + reg.penalty()
        _sync(device)
        t2 = time.perf_counter()
        loss.backward()
        _sync(device)
        t3 = time.perf_counter()
        opt.step()
        _sync(device)
        t4 = time.perf_counter()
        phases.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0))

    return step, reg


def bench_model(label, build, x, y, reg_kwargs, repeats, warmup, device, threads):
    torch.manual_seed(0)
    base = build().to(device)
    phases = {"plain": [], "t1": []}
    steps = {}
    steps["plain"], _ = make_step(copy.deepcopy(base), x, y, None, device, phases["plain"])
    steps["t1"], reg = make_step(copy.deepcopy(base), x, y, reg_kwargs, device, phases["t1"])
    for _ in range(warmup):
        for s in steps.values():
            s()
    for p in phases.values():
        p.clear()
    for _ in range(repeats):  # interleaved: plain, t1, plain, t1, ...
        for s in steps.values():
            s()
    stats = reg.last_stats
    rows = []
    med = {k: [1e3 * statistics.median(ph[i] for ph in v) for i in range(5)] for k, v in phases.items()}
    for name, m in med.items():
        rows.append({
            "model": label, "variant": name, "threads": threads, "device": str(device),
            "step_ms": m[4], "forward_ms": m[0], "penalty_ms": m[1], "backward_ms": m[2], "update_ms": m[3],
            "ratio": m[4] / med["plain"][4], "repeats": repeats,
            "clouds": len(stats.clouds) if name == "t1" else None,
            "neurons": stats.neurons if name == "t1" else None,
            "times_ms": [round(1e3 * ph[4], 3) for ph in phases[name]],
        })
    reg.close()
    return rows


def bench_trees(sizes, repeats, device):
    """Forward + backward of correlation_deaths -> T1 on one (256, n) cloud."""
    rows = []
    for n in sizes:
        g = torch.Generator(device="cpu").manual_seed(n)
        acts = (torch.randn(256, 16, generator=g) @ torch.randn(16, n, generator=g)
                + torch.randn(256, n, generator=g)).to(device).requires_grad_()

        def run():
            topodecorr.t1(topodecorr.correlation_deaths(acts).deaths).backward()

        for _ in range(2):
            run()
        _sync(device)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            _sync(device)
            ts.append(time.perf_counter() - t0)
        rows.append({"model": f"tree n={n}", "variant": "correlation_deaths fwd+bwd", "device": str(device),
                     "step_ms": 1e3 * statistics.median(ts), "repeats": repeats})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (CPU)")
    ap.add_argument("--models", default="mlp,resnet18,resnet18-1024rows,gpt,gpt-256rows",
                    help="subset of mlp,resnet18,resnet18-1024rows,gpt,gpt-256rows,gpt2-small")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    models = args.models.split(",")
    if device.type == "cuda" and "gpt2-small" not in models:
        models.append("gpt2-small")
    g = torch.Generator().manual_seed(0)

    def data_mlp():
        return torch.rand(256, 784, generator=g).to(device), torch.randint(0, 10, (256,), generator=g).to(device)

    def data_img():
        return torch.randn(32, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (32,), generator=g).to(device)

    def data_tok(batch=8, t=128):
        ids = torch.randint(0, 256, (batch, t + 1), generator=g).to(device)
        return ids[:, :-1], ids[:, 1:]

    def resnet18():
        import torchvision

        return torchvision.models.resnet18(num_classes=10)

    specs = {
        "mlp": (paper_mlp, data_mlp, lambda m: dict(penalty="t1")),
        "resnet18": (resnet18, data_img, lambda m: dict(
            penalty="t1", layers=[x for x in m.modules() if isinstance(x, nn.ReLU)], mode="channel", pooled=False)),
        # at most 1024 of the B*H*W rows per cloud (the stem has 8192, layer1 2048)
        "resnet18-1024rows": (resnet18, data_img, lambda m: dict(
            penalty="t1", layers=[x for x in m.modules() if isinstance(x, nn.ReLU)], mode="channel", pooled=False,
            max_samples=1024)),
        "gpt": (GPTStack, data_tok, lambda m: dict(penalty="t1")),
        # row subsampling (issue 9.3): 256 of the 1024 token rows per block and step
        "gpt-256rows": (GPTStack, data_tok, lambda m: dict(penalty="t1", max_samples=256)),
        "gpt2-small": (lambda: GPTStack(d=768, heads=12, blocks=12), data_tok, lambda m: dict(penalty="t1")),
    }
    reps = args.repeats or (3 if args.quick else 15)
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    rows = []
    for th in threads:
        torch.set_num_threads(th)
        for name in models:
            build, data, kw = specs[name]
            x, y = data()
            probe = build()
            kwargs = kw(probe)
            if "layers" in kwargs:  # modules of the probe -> the same positions in each copy
                kwargs = dict(kwargs, layers=[n for n, m in probe.named_modules() if isinstance(m, nn.ReLU)])
            r = bench_model(name, build, x, y, kwargs, reps, 1 if args.quick else 3, device, th)
            rows += r
            print(markdown_table(r, ["model", "variant", "threads", "step_ms", "forward_ms", "penalty_ms",
                                     "backward_ms", "update_ms", "ratio", "clouds", "neurons"]), flush=True)
    if device.type == "cuda":
        rows += bench_trees([4096, 16384], reps, device)
    md = "# Architectures: regularised vs plain training steps\n\n" + markdown_table(
        rows, ["model", "variant", "threads", "device", "step_ms", "forward_ms", "penalty_ms", "backward_ms",
               "update_ms", "ratio", "clouds", "neurons", "repeats"])
    write_results("architectures", rows, settings=vars(args), markdown=md + "\n", directory=OUT)
    print(md)


if __name__ == "__main__":
    main()
