"""A character-level transformer language model with its feed-forward units decorrelated per block.

The text ships with Python itself: the help topics of the standard library's
``pydoc_data.topics`` (about 0.8 MB of English and code). Nothing is downloaded.

On a transformer ``layers="auto"`` does the expected thing: one point cloud per
block over its feed-forward hidden units, with the tokens as samples::

    reg = topodecorr.Decorrelation(model, penalty="t1", weight=1e-3)   # layers="auto"
    with reg:
        ...  loss = lm_loss + reg.penalty()

Here every block is an ``nn.TransformerEncoderLayer`` with ``activation=nn.GELU()``
(a module), so the units read are the GELU's outputs: (batch, tokens, 4*d) ->
a cloud of batch*tokens samples over 4*d neurons, one per block. With a long
context, ``max_samples=256`` (``--max-samples``) correlates a fresh random subset
of the token rows each step instead of all of them: the cost of the correlations
falls in proportion, and the deaths stay close (BENCHMARKS.md, "Row subsampling").

Run: ``python examples/char_transformer.py`` (a few minutes on a CPU), or
``--quick`` for a smoke run under a minute. Prints, with and without the
regulariser side by side: training and validation loss (nats per character),
the median step time, and the mean death of each block's FFN units on
validation text (higher = less redundant units).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

import topodecorr


def load_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class CharLM(nn.Module):
    """Token + position embeddings, causal pre-norm transformer blocks, a linear head."""

    def __init__(self, vocab: int, context: int, d: int = 128, heads: int = 4, blocks: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, heads, dim_feedforward=4 * d, dropout=0.0, activation=nn.GELU(),
                batch_first=True, norm_first=True,
            )
            for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        for blk in self.blocks:
            x = blk(x, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))


def batches(data: torch.Tensor, batch: int, context: int, g: torch.Generator):
    while True:
        start = torch.randint(0, len(data) - context - 1, (batch,), generator=g)
        idx = start[:, None] + torch.arange(context + 1)
        chunk = data[idx]
        yield chunk[:, :-1], chunk[:, 1:]


def train(penalty: str, weight: float, data, vocab: int, args) -> dict:
    train_ids, val_ids = data
    torch.manual_seed(args.seed)
    model = CharLM(vocab, args.context, d=args.d, blocks=args.blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    reg = None
    if penalty != "none":
        reg = topodecorr.Decorrelation(model, penalty=penalty, weight=weight, max_samples=args.max_samples)
    g = torch.Generator().manual_seed(args.seed + 1)
    times, losses = [], []
    model.train()
    with reg or contextlib.nullcontext():
        for step, (x, y) in zip(range(args.steps), batches(train_ids, args.batch, args.context, g)):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
            total = loss + reg.penalty() if reg is not None else loss
            total.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    model.eval()
    ffn = []
    hooks = [blk.activation.register_forward_hook(lambda m, i, o: ffn.append(o)) for blk in model.blocks]
    gv = torch.Generator().manual_seed(12345)  # the same validation windows for both runs
    with torch.no_grad():
        x, y = next(batches(val_ids, 64, args.context, gv))
        val = nn.functional.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1)).item()
        deaths = [
            topodecorr.decorrelation_result([h.reshape(-1, h.shape[-1])], "t1", output_layers=[False])
            .deaths[0].mean().item()
            for h in ffn
        ]
    for h in hooks:
        h.remove()
    tail = losses[-max(1, len(losses) // 5):]
    return {
        "loss": statistics.mean(tail),
        "val_loss": val,
        "step_ms": 1e3 * statistics.median(times[1:] or times),
        "mean_death": deaths,
        "last_stats": reg.last_stats if reg is not None else None,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="character-level transformer LM with and without T1 per block")
    ap.add_argument("--quick", action="store_true", help="a smoke run (40 steps), under a minute")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--d", type=int, default=128, help="model width (the FFN has 4*d units per block)")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight", type=float, default=1e-3, help="lambda of T1 (summed over the blocks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--max-samples", type=int, default=None,
                    help="token rows per block and step for the correlations, drawn afresh each step "
                         "(default: all batch*context rows; 256-512 keeps a long context cheap)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.batch, args.d = 40, 16, 64
    text = load_text()
    chars = sorted(set(text))
    ids = _encode(text, chars)
    cut = int(0.9 * len(ids))
    data = (ids[:cut], ids[cut:])
    results = {
        "plain": train("none", 0.0, data, len(chars), args),
        "t1": train("t1", args.weight, data, len(chars), args),
    }
    print(f"{len(text)} characters, {len(chars)} distinct; {args.blocks} blocks of {4 * args.d} FFN units")
    print(f"{'':6s} {'train loss':>10s} {'val loss':>9s} {'step ms':>8s}  mean death per block (val)")
    for name, r in results.items():
        d = " ".join(f"{v:.3f}" for v in r["mean_death"])
        print(f"{name:6s} {r['loss']:10.3f} {r['val_loss']:9.3f} {r['step_ms']:8.1f}  {d}")
    print(f"step time ratio t1 / plain: {results['t1']['step_ms'] / results['plain']['step_ms']:.2f}x")
    return results


def _encode(text: str, chars: list[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.int64)


if __name__ == "__main__":
    main()
