"""The training callbacks take ``layers=`` (names, patterns, modules) and Hugging Face gradient checkpointing."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import topodecorr as td

try:
    import lightning.pytorch as L
except ImportError:  # the lightning extra is not installed
    L = None
try:
    import transformers
except ImportError:  # the models extra is not installed
    transformers = None

needs_lightning = pytest.mark.skipif(L is None, reason="needs the lightning extra")
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs the models extra (transformers)")
WEIGHT = 0.05


# -- Lightning -----------------------------------------------------------------------------------

if L is not None:

    class _Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))
            self.seen = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            task = F.cross_entropy(self(x), y)
            self.seen.append((x, task.detach()))
            return task

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # the weights stay: the reference can rerun


    class _Checkpointed(_Net):
        """The hidden block under torch.utils.checkpoint (reentrant or not); gradients kept before each step."""

        def __init__(self, reentrant):
            super().__init__()
            self.reentrant, self.grads = reentrant, []

        def forward(self, x):
            h = self.net[0](x)  # the checkpointed block's input needs a gradient (reentrant checkpoint)
            block = lambda t: self.net[2](self.net[1](t))  # noqa: E731  (the captured ReLU is not its last op)
            if self.reentrant is None:
                h = block(h)
            else:
                h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=self.reentrant)
            return self.net[4](self.net[3](h))

        def on_before_optimizer_step(self, optimizer):
            self.grads.append([p.grad.clone() for p in self.parameters()])


def _fit(cb, module):
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, callbacks=[cb], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's own notes about workers and logging
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=32))
    return cb.regulariser


@pytest.mark.slow
@needs_lightning
@pytest.mark.parametrize("how", ["name", "pattern", "module"])
def test_lightning_callback_takes_layers(how):
    from topodecorr.integrations.lightning import DecorrelationCallback

    module = _Net()
    layers = {"name": ["net.1"], "pattern": ["net.[13]"], "module": [module.net[1]]}[how]
    cb = DecorrelationCallback(penalty="t1", weight=WEIGHT, layers=layers, log=False)
    reg = _fit(cb, module)
    want = 12 if how != "pattern" else 12 + 8
    assert reg.last_stats.neurons == want  # the chosen layers only: no output layer with explicit layers
    x, _ = module.seen[-1]
    acts = [module.net[1](module.net[0](x))]
    if how == "pattern":
        acts.append(module.net[3](module.net[2](acts[0])))
    ref = WEIGHT * td.t1(td.correlation_deaths(torch.cat(acts, dim=1)).deaths)
    assert reg.last_stats.penalty == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.slow
@needs_lightning
def test_lightning_callback_under_activation_checkpointing_gives_the_gradients_without_it():
    from topodecorr.integrations.lightning import DecorrelationCallback

    grads = {}
    for reentrant in (None, False, True):
        module = _Checkpointed(reentrant)
        _fit(DecorrelationCallback(penalty="t1", weight=1.0, log=False), module)
        grads[reentrant] = module.grads
        assert sum(len(m._forward_hooks) for m in module.modules()) == 0  # nothing left after fit
    for reentrant in (False, True):
        for got, want in zip(grads[reentrant], grads[None]):
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@needs_lightning
def test_lightning_callback_checks_layers_without_a_model():
    from topodecorr.integrations.lightning import DecorrelationCallback

    DecorrelationCallback(layers=["net.1"], mode="features_last")  # a name it cannot match yet: fine
    with pytest.raises(TypeError, match="a layer must be an nn.Module or a name pattern, got float"):
        DecorrelationCallback(layers=[1.5])
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        DecorrelationCallback(backend="nonsense")
    with pytest.raises(TypeError, match="unexpected keyword argument 'layer'"):
        DecorrelationCallback(layer=["net.1"])


@pytest.mark.slow
@needs_lightning
def test_lightning_callback_names_a_missing_layer_when_fit_starts():
    from topodecorr.integrations.lightning import DecorrelationCallback

    with pytest.raises(ValueError, match=r"layer pattern 'body.1' matches no module of _Net; names look like "
                                         r"\['net', 'net.0', 'net.1'"):
        _fit(DecorrelationCallback(layers=["body.1"]), _Net())


# -- Hugging Face ----------------------------------------------------------------------------------


def _gpt2(**extra):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, **extra,
    )
    return transformers.GPT2LMHeadModel(config)


def _args(**kw):  # the TrainingArguments fields the callback reads
    return SimpleNamespace(label_smoothing_factor=0.0, gradient_accumulation_steps=1, **kw)


def _mlp_acts(model, ids, blocks):
    """Each chosen block's mlp.act output, recomputed by hand, as (tokens, 128)."""
    out = []
    hooks = [model.transformer.h[b].mlp.act.register_forward_hook(lambda m, i, o: out.append(o.reshape(-1, 128)))
             for b in blocks]
    try:
        loss = model(input_ids=ids, labels=ids).loss
    finally:
        for h in hooks:
            h.remove()
    return loss, out


@pytest.mark.slow
@needs_transformers
@pytest.mark.parametrize("how", ["name", "pattern", "module"])
def test_hf_callback_takes_layers_on_gpt2(how):
    from topodecorr.integrations.transformers import DecorrelationCallback

    model = _gpt2()
    layers = {"name": ["transformer.h.1.mlp.act"], "pattern": ["transformer.h.*.mlp.act"],
              "module": [model.transformer.h[1].mlp.act]}[how]
    blocks = [0, 1] if how == "pattern" else [1]
    cb = DecorrelationCallback(penalty="t1", weight=WEIGHT, layers=layers, mode="features_last", pooled=False)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    model.train()
    cb.on_train_begin(_args(), None, None, model=model)
    try:
        loss = model(input_ids=ids, labels=ids).loss
    finally:
        cb.on_train_end(None, None, None)
    assert cb.regulariser.last_stats.clouds == (128,) * len(blocks)
    task, acts = _mlp_acts(model, ids, blocks)
    ref = task + WEIGHT * sum(td.t1(td.correlation_deaths(a).deaths) for a in acts)
    torch.testing.assert_close(loss, ref)


@pytest.mark.slow
@needs_transformers
@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing_gives_the_gradients_without_it(reentrant):
    from topodecorr.integrations.transformers import DecorrelationCallback

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    grads, stats = [], []
    for ckpt in (False, True):
        model = _gpt2().train()
        if ckpt:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        cb = DecorrelationCallback(penalty="t1", weight=WEIGHT)
        cb.on_train_begin(_args(), None, None, model=model)
        try:
            for _ in range(2):  # from the second step on, a re-captured recompute would show
                model.zero_grad()
                model(input_ids=ids, labels=ids).loss.backward()
        finally:
            cb.on_train_end(None, None, None)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        stats.append(cb.regulariser.last_stats)
    task = _gpt2().train()
    task(input_ids=ids, labels=ids).loss.backward()  # no penalty: the comparison below can fail
    assert max(float((grads[0][n] - p.grad).abs().max()) for n, p in task.named_parameters()) > 1e-3
    assert stats[1].clouds == stats[0].clouds == (128, 128)
    assert stats[1].penalty == pytest.approx(stats[0].penalty, rel=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@needs_transformers
def test_hf_callback_every_adds_the_penalty_on_every_kth_training_forward_only():
    from topodecorr.integrations.transformers import DecorrelationCallback

    model = _gpt2().train()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    cb = DecorrelationCallback(penalty="t1", weight=WEIGHT, every=2)
    cb.on_train_begin(_args(), None, None, model=model)
    try:
        with_cb = [float(model(input_ids=ids, labels=ids).loss) for _ in range(4)]
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, labels=ids)  # an evaluation forward: not a step
        model.train()
    finally:
        cb.on_train_end(None, None, None)
    task = float(model(input_ids=ids, labels=ids).loss)
    assert cb.regulariser.step == 4
    assert with_cb[1] == pytest.approx(task) and with_cb[3] == pytest.approx(task)
    assert with_cb[0] == with_cb[2] and with_cb[0] > task + 1e-3
