"""Regularised vs plain training steps on the architectures people train, against their floor.

One command runs everything (CPU, 1 and 2 torch threads, 30 repeats, about half
an hour on an idle 2-core machine)::

    python benchmarks/architectures.py

Run it only on an idle machine (stop any sweep first): a process on the other
core slows the plain step more than the penalty and flatters the ratio. The load
average before and after is written into the output. Other uses::

    python benchmarks/architectures.py --quick              # 3 repeats: a smoke run, not a measurement
    python benchmarks/architectures.py --models mlp --threads 2
    python benchmarks/architectures.py --parallel-trees     # many trees on numba's own pool (for comparison)
    python benchmarks/architectures.py --device cuda        # the same on a GPU, plus single trees

Models (synthetic inputs; each variant owns its copy of the model and optimiser):

* ``mlp``: the paper's MLP 784-450-350-200-10, batch 256, T1 over its 1010
  neurons in one pooled cloud;
* ``resnet18``: torchvision ``resnet18(num_classes=10)`` at 32x32, batch 32,
  every channel, one tree per ReLU call (17 clouds, ``mode="channel"``);
* ``resnet18-cifar``: the CIFAR-style ResNet-18 (3x3 stem, no max-pool, widths
  32-64-128-256), batch 64, every channel, one tree per ReLU call;
* ``gpt``: 4 pre-norm causal ``nn.TransformerEncoderLayer`` blocks, d = 256,
  FFN 1024 (GELU), 16 x 64 tokens, T1 per block over the FFN units
  (``layers="auto"``: 4 clouds of 1024 rows x 1024 neurons);
* ``gpt-256rows``: the same with ``max_samples=256``;
* optional: ``resnet18-1024rows`` (``max_samples=1024``) and, on CUDA,
  ``gpt2-small`` (12 blocks, d = 768).

What is timed, all in one process: plain and regularised steps **solo** (all
plain repeats, then all regularised ones) and **interleaved** (plain, T1, plain,
...), each phase of a step on its own (forward + loss, the penalty call,
backward, SGD update; device sync on CUDA). The **floor** is the plain step plus,
per cloud, the product ``Z^T Z`` by ``torch.mm``, the library's MST kernel and
one pass over the activations, timed in the same run. Denormal floats are
flushed (``torch.set_flush_denormal(True)``; a plain transformer once ran 7x
slow on them). The op counts per step (torch profiler, independent of load)
say how many passes over the activations the penalty makes and which op
holds it up; the products by ``torch.mm`` and by NumPy's syrk on one thread are
timed side by side per cloud size.

Output: ``benchmarks/out/architectures.md`` (the summary: machine, torch build,
BLAS, load average, the tables) and ``architectures.{json,csv}`` (raw times).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine_info, markdown_table, write_results  # noqa: E402

import topodecorr  # noqa: E402
from topodecorr._kernels import mst_edges  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"

#: the issue-18 targets (ratio of medians, at 1 and at 2 threads)
TARGETS = {"mlp": 1.8, "resnet18": 1.3, "resnet18-cifar": 1.4, "gpt": 1.6, "gpt-256rows": 1.2}
FLOOR_TARGET = 1.15
PHASES = ("forward", "penalty", "backward", "update", "step")


def paper_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 450), nn.ReLU(), nn.Linear(450, 350), nn.ReLU(),
        nn.Linear(350, 200), nn.ReLU(), nn.Linear(200, 10),
    )


class _Block(nn.Module):
    """CIFAR ResNet basic block: two 3x3 convolutions, a shortcut, one ReLU module called twice."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.short(x))


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 images: 3x3 stem, no max-pool, widths 32-64-128-256, [2, 2, 2, 2] blocks."""

    def __init__(self, widths=(32, 64, 128, 256), classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for k, w in enumerate(widths):
            for j in range(2):
                blocks.append(_Block(cin, w, 2 if (j == 0 and k > 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class GPTStack(nn.Module):
    """Token embeddings, ``blocks`` causal pre-norm transformer blocks, an LM head."""

    def __init__(self, vocab=256, context=64, d=256, heads=4, blocks=4):
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
    """One training step; ``reg_kwargs=None`` is the plain step. Appends phase times (s) to ``phases``."""
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

    return step, reg, model


def _med(ph, i):
    return 1e3 * statistics.median(p[i] for p in ph)


def _spread(ph):
    """Interquartile range of the step times (ms)."""
    q = statistics.quantiles([1e3 * p[4] for p in ph], n=4) if len(ph) > 1 else [0.0, 0.0, 0.0]
    return q[2] - q[0]


def _time_steps(steps, repeats, warmup):
    """Solo (all of one variant, then the next) and interleaved runs; phase times per (schedule, variant)."""
    out = {}
    for _ in range(warmup):
        for s in steps.values():
            s[0]()
    for name, (step, ph) in steps.items():
        ph.clear()
        for _ in range(repeats):
            step()
        out[("solo", name)] = list(ph)
    for _, ph in steps.values():
        ph.clear()
    for _ in range(repeats):
        for step, _ in steps.values():
            step()
    for name, (_, ph) in steps.items():
        out[("interleaved", name)] = list(ph)
    return out


def _clouds(model, reg, x, max_samples):
    """The (rows, neurons) clouds the regulariser builds from one forward pass (detached)."""
    model(x)  # with gradients: the regulariser captures only then
    acts = [a.detach() for a in reg.captured_activations()]
    reg.penalty()  # releases the captured tensors (its graph is dropped unused)
    if reg.pooled:
        acts = [torch.cat(acts, dim=1)]
    if max_samples is not None:
        acts = [a[:max_samples] for a in acts]
    return [a.float().contiguous() for a in acts]


def _time_floor(clouds, repeats, device):
    """Per cloud: torch.mm product, the MST kernel, one pass; and NumPy's syrk on one thread beside them."""
    from topodecorr.correlation import _numpy_blas_threads

    def med(fn):
        fn()
        _sync(device)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(ts)

    rows = []
    for z in clouds:
        P = z.T @ z
        r = {"rows": z.shape[0], "neurons": z.shape[1], "mm_ms": med(lambda: z.T @ z),
             "kernel_ms": med(lambda: mst_edges(P, abs_corr=True)), "pass_ms": med(lambda: torch.mul(z, 1.0))}
        if device.type == "cpu":
            a = z.numpy()
            with _numpy_blas_threads(1):
                r["syrk1_ms"] = med(lambda: a.T @ a)
        rows.append(r)
    return rows


def _op_counts(step, min_numel):
    """Calls and self time (ms) per op of one step, for ops reading a tensor as large as the smallest cloud."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    counts: dict[str, list] = {}
    for ev in prof.events():
        if "topodecorr" in ev.name:  # the op's own work (numba, NumPy's syrk), its autograd node
            c = counts.setdefault(ev.name, [0, 0.0])
            c[0] += 1
            c[1] += ev.self_cpu_time_total / 1e3
            continue
        if not ev.name.startswith("aten::") or ev.name in _VIEWS:
            continue
        shapes = [s for s in (ev.input_shapes or []) if isinstance(s, (list, tuple)) and s]
        if not any(_numel(s) >= min_numel for s in shapes):
            continue
        c = counts.setdefault(ev.name, [0, 0.0])
        c[0] += 1
        c[1] += ev.self_cpu_time_total / 1e3
    return counts


_VIEWS = {"aten::view", "aten::as_strided", "aten::t", "aten::transpose", "aten::detach", "aten::reshape",
          "aten::_reshape_alias", "aten::expand", "aten::select", "aten::slice", "aten::permute", "aten::empty",
          "aten::empty_like", "aten::empty_strided", "aten::alias", "aten::unsqueeze", "aten::squeeze",
          "aten::_unsafe_view", "aten::lift_fresh", "aten::numpy_T", "aten::resolve_conj", "aten::resolve_neg"}


def _numel(shape):
    n = 1
    for s in shape:
        n *= int(s) if isinstance(s, int) else 1
    return n


def _penalty_ops(steps, min_numel):
    """The regularised step's op counts minus the plain step's: what the penalty adds, forward and backward."""
    plain = _op_counts(steps["plain"][0], min_numel)
    reg = _op_counts(steps["t1"][0], min_numel)
    rows = []
    for name, (calls, ms) in reg.items():
        p_calls, p_ms = plain.get(name, (0, 0.0))
        if calls - p_calls > 0:
            rows.append({"op": name, "extra_calls": calls - p_calls, "extra_self_ms": ms - p_ms})
    rows.sort(key=lambda r: -r["extra_self_ms"])
    return rows


def bench_model(label, build, x, y, reg_kwargs, repeats, warmup, device, threads, profile_ops):
    """Solo and interleaved medians per phase, the floor of the same run, and the penalty's op counts."""
    torch.manual_seed(0)
    base = build().to(device)
    phases = {"plain": [], "t1": []}
    plain_step, _, _ = make_step(copy.deepcopy(base), x, y, None, device, phases["plain"])
    t1_step, reg, t1_model = make_step(copy.deepcopy(base), x, y, reg_kwargs, device, phases["t1"])
    steps = {"plain": (plain_step, phases["plain"]), "t1": (t1_step, phases["t1"])}
    timed = _time_steps(steps, repeats, warmup)
    stats = reg.last_stats
    clouds = _clouds(t1_model, reg, x, reg_kwargs.get("max_samples"))
    floor = _time_floor(clouds, repeats, device)
    extra_floor = sum(f["mm_ms"] + f["kernel_ms"] + f["pass_ms"] for f in floor)
    ops = _penalty_ops(steps, min(z.numel() for z in clouds)) if profile_ops else []
    reg.close()
    rows = []
    for (sched, name), ph in timed.items():
        m = {k: _med(ph, i) for i, k in enumerate(PHASES)}
        plain = _med(timed[(sched, "plain")], 4)
        rows.append({
            "model": label, "schedule": sched, "variant": name, "threads": threads, "device": str(device),
            **{f"{k}_ms": v for k, v in m.items()}, "ratio": m["step"] / plain,
            "floor_ms": plain + extra_floor, "floor_ratio": (plain + extra_floor) / plain,
            "over_floor": m["step"] / (plain + extra_floor), "spread_ms": _spread(ph), "repeats": len(ph),
            "clouds": len(stats.clouds), "neurons": stats.neurons,
            "times_ms": [round(1e3 * p[4], 3) for p in ph],
        })
    return rows, [{"model": label, "threads": threads, **f} for f in floor], \
        [{"model": label, "threads": threads, **o} for o in ops]


def _specs(device):
    """name -> (build, data, regulariser options for a probe model)."""
    g = torch.Generator().manual_seed(0)

    def relus(m):
        return [n for n, x in m.named_modules() if isinstance(x, nn.ReLU)]

    def images(batch):
        def data():
            return (torch.randn(batch, 3, 32, 32, generator=g).to(device),
                    torch.randint(0, 10, (batch,), generator=g).to(device))
        return data

    def tokens(batch=16, t=64):
        def data():
            ids = torch.randint(0, 256, (batch, t + 1), generator=g).to(device)
            return ids[:, :-1], ids[:, 1:]
        return data

    def mlp_data():
        return torch.rand(256, 784, generator=g).to(device), torch.randint(0, 10, (256,), generator=g).to(device)

    def resnet18():
        import torchvision

        return torchvision.models.resnet18(num_classes=10)

    def channels(m, **kw):
        return dict(penalty="t1", layers=relus(m), mode="channel", pooled=False, **kw)

    return {
        "mlp": (paper_mlp, mlp_data, lambda m: dict(penalty="t1")),
        "resnet18": (resnet18, images(32), channels),
        "resnet18-cifar": (CifarResNet18, images(64), channels),
        "resnet18-1024rows": (resnet18, images(32), lambda m: channels(m, max_samples=1024)),
        "gpt": (GPTStack, tokens(), lambda m: dict(penalty="t1")),
        "gpt-256rows": (GPTStack, tokens(), lambda m: dict(penalty="t1", max_samples=256)),
        "gpt2-small": (lambda: GPTStack(context=128, d=768, heads=12, blocks=12), tokens(8, 128),
                       lambda m: dict(penalty="t1")),
    }


def bench_trees(sizes, repeats, device):
    """Forward + backward of correlation_deaths -> T1 on one (256, n) cloud (accelerators)."""
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


def build_info() -> dict:
    """The torch build (BLAS, CPU capability, OpenMP), NumPy's BLAS and numba's threading layer."""
    cfg = torch.__config__.show()
    keep = ("BLAS_INFO", "LAPACK_INFO", "CPU capability", "USE_OPENMP", "USE_MKL", "USE_MKLDNN")
    info = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "mkl": torch.backends.mkl.is_available(),
        "build": [x.strip() for line in cfg.splitlines() for x in line.split(",") if any(k in x for k in keep)],
        "parallel": [line.strip() for line in torch.__config__.parallel_info().splitlines()
                     if "backend" in line or "MKL" in line or "OpenMP" in line][:4],
    }
    try:
        from threadpoolctl import threadpool_info

        info["numpy_blas"] = [f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} threads)"
                              for p in threadpool_info() if p.get("user_api") == "blas"]
    except ImportError:
        info["numpy_blas"] = ["threadpoolctl not installed"]
    try:
        import numba

        info["numba_threading_layer"] = numba.config.THREADING_LAYER
    except ImportError:
        info["numba_threading_layer"] = None
    return info


def summary(rows, floors, ops, info, load, args) -> str:
    """The markdown summary: machine and build, ratios against targets and floors, phases, pieces, ops."""
    m = machine_info()
    lines = [
        "# Architectures: regularised (T1) vs plain training steps", "",
        f"{m['date_utc']}, {m['cpu']} ({m['cpu_count']} cores), torch {info['torch']}, "
        f"load average before {load[0]}, after {load[1]}; flush denormal: {not args.keep_denormals}; "
        f"parallel trees: {args.parallel_trees}; repeats {args.repeats or (3 if args.quick else 30)}.", "",
        "Torch build: " + "; ".join(info["build"] + info["parallel"]) + ".",
        f"NumPy BLAS: {'; '.join(info['numpy_blas'])}. numba threading layer: {info['numba_threading_layer']}.", "",
        "## Steps (medians, ms)", "",
        "`ratio`: T1 step / plain step; `floor`: plain step + product (torch.mm) + MST kernel + one pass per "
        f"cloud, same run; met: ratio <= target and T1 step <= {FLOOR_TARGET} x floor; spread: interquartile "
        "range of the step times.", "",
    ]
    table = []
    for r in rows:
        if r["variant"] != "t1":
            continue
        p = next(q for q in rows if q["model"] == r["model"] and q["threads"] == r["threads"]
                 and q["schedule"] == r["schedule"] and q["variant"] == "plain")
        target = TARGETS.get(r["model"])
        met = None if target is None else ("yes" if r["ratio"] <= target and r["over_floor"] <= FLOOR_TARGET
                                           else "**no**")
        table.append({**r, "plain_ms": p["step_ms"], "t1_ms": r["step_ms"], "target": target, "met": met,
                      "plain_spread_ms": p["spread_ms"], "t1_spread_ms": r["spread_ms"]})
    lines.append(markdown_table(table, ["model", "threads", "schedule", "plain_ms", "t1_ms", "ratio", "floor_ms",
                                        "floor_ratio", "over_floor", "target", "met", "plain_spread_ms",
                                        "t1_spread_ms", "clouds", "neurons"]))
    lines += ["", "## Phases (interleaved medians, ms)", ""]
    lines.append(markdown_table([r for r in rows if r["schedule"] == "interleaved"],
                                ["model", "threads", "variant", "forward_ms", "penalty_ms", "backward_ms",
                                 "update_ms", "step_ms"]))
    lines += ["", "## Floor pieces per cloud (same run, ms; syrk1: NumPy's syrk on one BLAS thread)", ""]
    lines.append(markdown_table(floors, ["model", "threads", "rows", "neurons", "mm_ms", "syrk1_ms", "kernel_ms",
                                         "pass_ms"]))
    if ops:
        lines += ["", "## What the penalty adds to a step, op by op (torch profiler, first thread count)", "",
                  "Ops reading a tensor at least as large as the smallest cloud, regularised step minus plain "
                  "step (forward and backward); `topodecorr::` rows are the op's own work (product, tree).", ""]
        lines.append(markdown_table(ops, ["model", "op", "extra_calls", "extra_self_ms"]))
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (CPU; default 1,2)")
    ap.add_argument("--models", default="mlp,resnet18,resnet18-cifar,gpt,gpt-256rows",
                    help="subset of mlp,resnet18,resnet18-cifar,resnet18-1024rows,gpt,gpt-256rows,gpt2-small")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per variant and schedule (default 30)")
    ap.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up: a smoke run, not a measurement")
    ap.add_argument("--keep-denormals", action="store_true", help="do not flush denormal floats")
    ap.add_argument("--parallel-trees", action="store_true", help="many trees on numba's pool (not the default)")
    ap.add_argument("--no-profile", action="store_true", help="skip the op counts")
    args = ap.parse_args(argv)
    load_before = [round(x, 2) for x in os.getloadavg()]
    device = torch.device(args.device)
    torch.set_flush_denormal(not args.keep_denormals)
    import topodecorr._kernels as K

    K.PARALLEL_TREES = args.parallel_trees
    models = args.models.split(",")
    if device.type == "cuda" and "gpt2-small" not in models:
        models.append("gpt2-small")
    specs = _specs(device)
    reps = args.repeats or (3 if args.quick else 30)
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    rows, floors, ops = [], [], []
    for k, th in enumerate(threads):
        torch.set_num_threads(th)
        for name in models:
            build, data, kw = specs[name]
            x, y = data()
            r, f, o = bench_model(name, build, x, y, kw(build()), reps, 1 if args.quick else 3, device, th,
                                  profile_ops=k == 0 and not args.no_profile)
            if device.type == "cpu" and torch.get_num_threads() != th:  # a figure at the wrong thread count
                raise RuntimeError(f"{name}: torch's thread count changed from {th} to "
                                   f"{torch.get_num_threads()} during the run")
            rows += r
            floors += f
            ops += o[:12]
            print(markdown_table(r, ["model", "schedule", "variant", "threads", "step_ms", "penalty_ms",
                                     "backward_ms", "ratio", "floor_ratio", "over_floor", "spread_ms"]), flush=True)
    if device.type == "cuda":
        rows += bench_trees([4096, 16384], reps, device)
    load_after = [round(x, 2) for x in os.getloadavg()]
    info = build_info()
    md = summary([r for r in rows if "schedule" in r], floors, ops, info, (load_before, load_after), args)
    if device.type == "cuda":
        md += "\n## Single trees\n\n" + markdown_table([r for r in rows if "schedule" not in r],
                                                       ["model", "variant", "device", "step_ms", "repeats"]) + "\n"
    paths = write_results("architectures", rows, settings=vars(args), markdown=md, directory=OUT,
                          extra={"floors": floors, "ops": ops, "build": info,
                                 "load_average": {"before": load_before, "after": load_after}})
    print(md)
    print(f"written: {paths['md']}")


if __name__ == "__main__":
    main()
