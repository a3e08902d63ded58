"""Framework integrations: the penalty is in the loss the framework back-propagates.

Each test fits a small model for a few steps with the callback, records the
parameters before and the gradients after each optimiser step, and compares
the gradients with those of task loss + weight * T1 computed by hand on the
same batches (activations read by hand, T1 of ``correlation_deaths``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import topodecorr as td

WEIGHT = 0.05


def _by_hand_t1(acts: list[torch.Tensor]) -> torch.Tensor:
    return td.t1(td.correlation_deaths(torch.cat([a.reshape(a.shape[0], -1) for a in acts], dim=1)).deaths)


def test_import_topodecorr_stays_free_of_optional_frameworks():
    code = textwrap.dedent(
        """
        import sys
        import topodecorr, topodecorr.monitor, topodecorr.inspection, topodecorr.integrations
        heavy = ("lightning", "pytorch_lightning", "transformers", "tensorboard", "matplotlib")
        print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- Lightning -----------------------------------------------------------------------------------

try:
    import lightning.pytorch as L
except ImportError:  # the lightning extra is not installed
    L = None

needs_lightning = pytest.mark.skipif(L is None, reason="needs the lightning extra")
_LightningModule = L.LightningModule if L is not None else nn.Module
_LightningCallback = L.Callback if L is not None else object


class _Net(_LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Recorder(_LightningCallback):
    """Parameters and batches before each optimiser step, gradients just before it; hooks in validation."""

    def __init__(self, reg_cb):
        self.reg_cb = reg_cb
        self.windows: list[dict] = []
        self.batches: list = []
        self.state = None
        self.val_batches = 0
        self.val_hooks: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.batches:
            self.state = copy.deepcopy(pl_module.state_dict())
        self.batches.append([t.clone() for t in batch])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}
        self.windows.append({"state": self.state, "batches": self.batches, "grads": grads})
        self.batches, self.state = [], None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val_batches += 1
        self.val_hooks.append(sum(len(m._forward_hooks) for m in pl_module.modules()))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        reg = self.reg_cb.regulariser
        self.val_hooks.append(len(reg._captured) + (reg._output is not None))


def _loaders(n=192, batch=32):
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    ds = torch.utils.data.TensorDataset(X, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch), torch.utils.data.DataLoader(ds, batch_size=batch)


def _reference_grads(state, batches, accumulate, autocast):
    module = _Net()
    module.load_state_dict(state)
    task_only = {}
    for with_penalty in (False, True):
        module.zero_grad()
        for x, y in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                h = module.net[1](module.net[0](x))
                out = module.net[2](h)
                loss = F.cross_entropy(out, y)
                if with_penalty:
                    loss = loss + WEIGHT * _by_hand_t1([h, out])
            (loss / accumulate).backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters()}
        if not with_penalty:
            task_only = grads
    return grads, task_only


@pytest.mark.slow
@needs_lightning
@pytest.mark.parametrize("accumulate,precision", [(1, "32-true"), (2, "32-true"), (1, "bf16-mixed")])
def test_lightning_gradient_is_task_plus_weighted_penalty(tmp_path, accumulate, precision):
    from topodecorr.integrations.lightning import DecorrelationCallback

    module = _Net()
    cb = DecorrelationCallback(penalty="t1", weight=WEIGHT)
    rec = _Recorder(cb)
    train, val = _loaders()
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", devices=1, callbacks=[cb, rec], precision=precision,
        accumulate_grad_batches=accumulate, logger=L.loggers.CSVLogger(tmp_path), log_every_n_steps=1,
        val_check_interval=2 * accumulate, limit_val_batches=2, num_sanity_val_steps=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(module, train, val)
    assert len(rec.windows) == 3
    bf16 = precision == "bf16-mixed"
    for w in rec.windows:
        assert len(w["batches"]) == accumulate
        want, task_only = _reference_grads(w["state"], w["batches"], accumulate, bf16)
        for name, g in w["grads"].items():
            tol = dict(rtol=2e-2, atol=2e-3) if bf16 else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g, want[name], **tol)
        # the penalty's share of the gradient is far above the tolerance: the check can fail
        diff = max(float((want[n] - task_only[n]).abs().max()) for n in want)
        assert diff > (0.05 if bf16 else 1e-3)
    # validation ran, with no hook attached and nothing captured
    assert rec.val_batches >= 2
    assert set(rec.val_hooks) == {0}
    # the statistics went through the module's logger
    metrics = trainer.logged_metrics
    for key in ("penalty", "neurons", "dead", "min_death", "mean_death", "max_death"):
        assert f"decorrelation/{key}" in metrics
    assert float(metrics["decorrelation/neurons"]) == 15.0
    assert 0.0 <= float(metrics["decorrelation/min_death"]) <= float(metrics["decorrelation/max_death"]) <= 1.0
    csv = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "decorrelation/penalty" in csv.splitlines()[0]
    # fit is over: the module's own training_step is back, no hook is left
    assert "training_step" not in module.__dict__
    assert sum(len(m._forward_hooks) for m in module.modules()) == 0


@needs_lightning
def test_lightning_callback_checks_its_input():
    from topodecorr.integrations.lightning import DecorrelationCallback

    with pytest.raises(ValueError, match="unknown penalty"):
        DecorrelationCallback(penalty="t3")
    with pytest.raises(ValueError, match="weight"):
        DecorrelationCallback(weight=-1.0)
    with pytest.raises(TypeError, match="model="):
        DecorrelationCallback(model=nn.ReLU())


@pytest.mark.slow
@needs_lightning
def test_lightning_manual_optimisation_is_refused():
    from topodecorr.integrations.lightning import DecorrelationCallback

    module = _Net()
    module.automatic_optimization = False
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, callbacks=[DecorrelationCallback()], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="manual"):
        trainer.fit(module, _loaders()[0])
    assert "training_step" not in module.__dict__
