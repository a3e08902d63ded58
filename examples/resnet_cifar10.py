"""ResNet-18 on CIFAR-10 with every channel decorrelated: one spanning tree per ReLU call.

The regulariser in a torchvision model takes one call::

    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    reg = topodecorr.Decorrelation(model, layers=relus, mode="channel", pooled=False, weight=1e-3)
    with reg:
        ...  loss = task_loss + reg.penalty()

``mode="channel"``: a channel is a neuron and every image position is a sample,
so a (B, C, H, W) map is a cloud of B*H*W samples over C neurons.
``pooled=False``: each ReLU call is its own cloud (17 in resnet18: the stem and
two per BasicBlock, whose one ``nn.ReLU`` module is called twice).

Data: a local copy of CIFAR-10 (the "python version" batches) read by the
project's loader, ``--data-dir DIR`` (nothing is downloaded); ``--synthetic``
trains on generated 32x32 images (ten classes of coloured stripe patterns plus
noise) when no copy is at hand.

Run: ``python examples/resnet_cifar10.py --data-dir DIR`` (a few epochs on a
subset; a CPU is slow for this), or ``--quick --synthetic`` for a smoke run
under a minute. Prints, with and without the regulariser side by side: the
final training loss, test accuracy, the median step time, and the mean death
of the channels of the last block on the test images (higher = less redundant).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

import topodecorr


def synthetic_cifar(n_train: int, n_test: int, seed: int = 0):
    """Ten classes of 32x32 RGB images: a class-specific colour and stripe orientation, plus noise."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(10, 3, 1, 1, generator=g)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    angles = torch.arange(10) * (torch.pi / 10)
    stripes = torch.stack([torch.sin((xx * a.cos() + yy * a.sin()) * 0.8) for a in angles])  # (10, 32, 32)

    def make(n):
        y = torch.randint(0, 10, (n,), generator=g)
        x = 0.5 * colours[y] + 0.25 * stripes[y].unsqueeze(1) + 0.25 * torch.rand(n, 3, 32, 32, generator=g)
        return x.clamp(0, 1), y

    return make(n_train), make(n_test)


def load_data(args):
    if args.synthetic:
        return synthetic_cifar(args.train_size, args.test_size)
    from topodecorr.experiments.data import load_dataset

    d = load_dataset("cifar10", data_dir=args.data_dir, download=False)
    (Xtr, ytr), (Xte, yte) = d.train, d.test
    return (Xtr[: args.train_size], ytr[: args.train_size]), (Xte[: args.test_size], yte[: args.test_size])


def build_model():
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def relu_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.ReLU)]


def train(penalty: str, weight: float, data, args) -> dict:
    (Xtr, ytr), (Xte, yte) = data
    torch.manual_seed(args.seed)
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    # the plain run has no hooks at all (its step time is the baseline)
    reg = topodecorr.Decorrelation(
        model, layers=relu_layers(model), mode="channel", pooled=False, penalty=penalty, weight=weight
    ) if penalty != "none" else None
    mean = Xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = Xtr.std(dim=(0, 2, 3), keepdim=True)
    times, losses, step = [], [], 0
    model.train()
    with reg or contextlib.nullcontext():
        for _ in range(args.epochs):
            perm = torch.randperm(len(Xtr))
            for i in range(0, len(Xtr) - args.batch + 1, args.batch):
                if args.max_steps and step >= args.max_steps:
                    break
                idx = perm[i : i + args.batch]
                x = (Xtr[idx] - mean) / std
                if torch.rand(()) < 0.5:
                    x = x.flip(3)  # horizontal flip
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x), ytr[idx])
                total = loss + reg.penalty() if reg is not None else loss
                total.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
                losses.append(float(loss.detach()))
                step += 1
    model.eval()
    last_block = []
    hook = model.layer4[-1].relu.register_forward_hook(lambda m, i, o: last_block.append(o))
    with torch.no_grad():
        logits = torch.cat([model((Xte[i : i + 256] - mean) / std) for i in range(0, len(Xte), 256)])
        acc = (logits.argmax(1) == yte).float().mean().item()
        # the block's second ReLU call (its output) on the test images: one cloud over 512 channels
        deaths = topodecorr.decorrelation_result(
            [torch.cat(last_block[1::2]).movedim(1, -1).reshape(-1, 512)], "t1", output_layers=[False]).deaths[0]
    hook.remove()
    tail = losses[-max(1, len(losses) // 5):]
    return {
        "loss": statistics.mean(tail),
        "accuracy": acc,
        "step_ms": 1e3 * statistics.median(times[1:] or times),
        "steps": step,
        "mean_death": float(deaths.mean()),
        "last_stats": reg.last_stats if reg is not None else None,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="ResNet-18 on CIFAR-10 with and without T1 on every channel")
    ap.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py (a local copy)")
    ap.add_argument("--synthetic", action="store_true", help="generated images instead of CIFAR-10")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 8 steps of 16 images, under a minute")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--max-steps", type=int, default=0, help="stop each run after this many steps (0: no limit)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--weight", type=float, default=1e-3, help="lambda of T1 (summed over the 17 clouds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs, args.batch, args.max_steps = 1, 16, 8
        args.train_size, args.test_size = min(args.train_size, 256), min(args.test_size, 128)
    data = load_data(args)
    results = {"plain": train("none", 0.0, data, args), "t1": train("t1", args.weight, data, args)}
    print(f"{'':6s} {'train loss':>10s} {'test acc':>9s} {'step ms':>8s} {'mean death (layer4)':>20s}")
    for name, r in results.items():
        print(f"{name:6s} {r['loss']:10.3f} {r['accuracy']:9.3f} {r['step_ms']:8.1f} {r['mean_death']:20.3f}")
    s = results["t1"]["last_stats"]
    print(f"t1 step: {len(s.clouds)} clouds, {s.neurons} channels; step time ratio "
          f"{results['t1']['step_ms'] / results['plain']['step_ms']:.2f}x")
    return results


if __name__ == "__main__":
    main()
