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


@pytest.mark.slow
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
        self.val_hooks.append(len(reg.captured_activations()))


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


# -- Hugging Face transformers -------------------------------------------------------------------

try:
    import transformers
except ImportError:  # the models extra is not installed
    transformers = None

needs_transformers = pytest.mark.skipif(transformers is None, reason="needs the models extra (transformers)")
try:
    import accelerate  # noqa: F401  (transformers.Trainer needs it)
except ImportError:
    accelerate = None
needs_accelerate = pytest.mark.skipif(accelerate is None, reason="transformers.Trainer needs accelerate")
_TrainerCallback = transformers.TrainerCallback if transformers is not None else object


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=24, length=16):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _HFRecorder(_TrainerCallback):
    """Parameters at each step's start, every training forward's keyword arguments, gradients before the step."""

    def __init__(self):
        self.windows, self.calls, self.state = [], [], None
        self.eval_hooks, self.train_hooks, self.eval_captured = [], [], []
        self.reg_cb = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        model.register_forward_pre_hook(self._forward, with_kwargs=True)
        model.register_forward_hook(self._after)

    def _after(self, module, args, output):
        if not module.training:  # what an evaluation forward left in the regulariser: nothing
            self.eval_captured.append(len(self.reg_cb.regulariser.captured_activations()))

    def _forward(self, module, args, kwargs):
        inner = sum(len(m._forward_hooks) for m in module.transformer.modules())
        if module.training and torch.is_grad_enabled():
            self.calls.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
            self.train_hooks.append(inner)
        else:
            self.eval_hooks.append(inner)

    def on_step_begin(self, args, state, control, **kwargs):
        self.state = copy.deepcopy(self.model.state_dict())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.windows.append({"state": self.state, "calls": self.calls, "grads": grads})
        self.calls = []


def _hf_reference(state, calls, accumulate):
    model = _gpt2()
    model.load_state_dict(state)
    model.train()
    acts = []
    for block in model.transformer.h:
        block.mlp.act.register_forward_hook(lambda m, i, o: acts.append(o))
    grads = {}
    for with_penalty in (False, True):
        model.zero_grad()
        for kw in calls:
            acts.clear()
            out = model(**kw)
            # one cloud per block: its 128 hidden units, tokens as samples
            pen = sum(_by_hand_t1([a.reshape(-1, a.shape[-1])]) for a in acts) if with_penalty else 0.0
            if kw.get("num_items_in_batch") is not None:  # the model normalised over the whole window
                loss = out.loss + WEIGHT * pen / accumulate
            else:
                loss = (out.loss + WEIGHT * pen) / accumulate
            loss.backward()
        grads[with_penalty] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads[True], grads[False]


@pytest.mark.slow
@needs_transformers
@needs_accelerate
@pytest.mark.parametrize("accumulate", [1, 2])
def test_hf_trainer_gradient_is_task_plus_weighted_penalty(tmp_path, monkeypatch, accumulate):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from topodecorr.integrations.transformers import DecorrelationCallback

    model = _gpt2()
    cb = DecorrelationCallback(penalty="t1", weight=WEIGHT)
    rec = _HFRecorder()
    rec.reg_cb = cb
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=3,
        gradient_accumulation_steps=accumulate, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
        max_grad_norm=0.0, logging_steps=1, eval_strategy="steps", eval_steps=2, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), eval_dataset=_Tokens(8),
                                   callbacks=[cb, rec])
    trainer.train()
    assert len(rec.windows) == 3
    for w in rec.windows:
        assert len(w["calls"]) == accumulate
        want, task_only = _hf_reference(w["state"], w["calls"], accumulate)
        assert set(w["grads"]) == set(want)
        for name, g in w["grads"].items():
            torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-6)
        diff = max(float((want[n] - task_only[n]).abs().max()) for n in want)
        assert diff > 1e-3  # the penalty's share is far above the tolerance
    # the regulariser's hooks stay on the model while training runs; evaluation forwards record nothing
    assert rec.eval_captured and set(rec.eval_captured) == {0}
    assert all(h > 0 for h in rec.train_hooks)
    # the statistics are in the Trainer's logs
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 3
    for h in train_logs:
        assert h["decorrelation/neurons"] == 256.0  # two blocks x 128 hidden units
        assert 0.0 <= h["decorrelation/min_death"] <= h["decorrelation/max_death"] <= 1.0
        assert h["decorrelation/penalty"] > 0
    assert any("eval_loss" in h and "decorrelation/penalty" not in h for h in trainer.state.log_history)
    # training is over: no hook is left on the model
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 2  # _HFRecorder's


@pytest.mark.slow
@needs_transformers
def test_hf_callback_refuses_a_loss_it_cannot_reach(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from topodecorr.integrations.transformers import DecorrelationCallback

    with pytest.raises(ValueError, match="unknown penalty"):
        DecorrelationCallback(penalty="t3")
    from types import SimpleNamespace  # TrainingArguments' fields the callback reads

    cb = DecorrelationCallback()
    args = SimpleNamespace(label_smoothing_factor=0.1, gradient_accumulation_steps=1)
    with pytest.raises(RuntimeError, match="label_smoothing_factor"):
        cb.on_train_begin(args, None, None, model=_gpt2())
    # a training forward without labels has no loss to add the penalty to
    model = _gpt2().train()
    args.label_smoothing_factor = 0.0
    cb.on_train_begin(args, None, None, model=model)
    with pytest.raises(RuntimeError, match="pass labels"):
        model(input_ids=torch.randint(0, 64, (2, 8)))
    cb.on_train_end(None, None, None)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


@pytest.mark.slow
@needs_transformers
@pytest.mark.parametrize("accumulate,items", [(1, True), (2, True), (2, False)])
def test_hf_loss_path_of_the_trainer_gets_the_penalty(monkeypatch, accumulate, items):
    """The Trainer's own loss path, step by step (compute_loss, then training_step's scaling).

    With ``num_items_in_batch`` (a model that takes loss keywords, like GPT-2) the Trainer
    back-propagates ``outputs["loss"]`` as it is; without, it divides by the accumulation steps.
    """
    from types import SimpleNamespace

    from topodecorr.integrations.transformers import DecorrelationCallback

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = _gpt2().train()
    cb = DecorrelationCallback(penalty="t1", weight=WEIGHT)
    args = SimpleNamespace(gradient_accumulation_steps=accumulate, average_tokens_across_devices=True,
                           label_smoothing_factor=0.0)
    cb.on_train_begin(args, None, None, model=model)
    state = copy.deepcopy(model.state_dict())
    data = _Tokens(n=4 * accumulate)
    window = [{k: torch.stack([data[i][k] for i in range(4 * j, 4 * j + 4)]) for k in ("input_ids", "labels")}
              for j in range(accumulate)]
    n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
    calls = []
    for inputs in window:
        kw = {**inputs, "num_items_in_batch": torch.tensor(n_items)} if items else dict(inputs)
        calls.append(kw)
        loss = model(**kw)["loss"]  # Trainer.compute_loss
        if not items:
            loss = loss / accumulate  # Trainer.training_step
        loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    want, task_only = _hf_reference(state, calls, accumulate)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-6)
    assert max(float((want[n] - task_only[n]).abs().max()) for n in want) > 1e-3
    # an evaluation forward (eval mode, no gradient) gets no penalty and captures nothing
    model.eval()
    with torch.no_grad():
        plain = model(**window[0])["loss"]
    cb.on_train_end(None, None, None)
    with torch.no_grad():
        assert float(model(**window[0])["loss"]) == float(plain)
    # the Trainer's next training log gains the statistics, in logs and in log_history
    logs = {"loss": 1.0, "learning_rate": 0.1}
    history = SimpleNamespace(log_history=[{**logs, "step": 1}], global_step=1)
    cb.on_log(args, history, None, logs=logs)
    assert logs["decorrelation/neurons"] == 256.0 and history.log_history[-1]["decorrelation/neurons"] == 256.0
    assert logs["decorrelation/penalty"] > 0 and "decorrelation/max_death" in logs
    eval_logs = {"eval_loss": 1.0}
    cb.on_log(args, history, None, logs=eval_logs)
    assert eval_logs == {"eval_loss": 1.0}


@pytest.mark.slow
@needs_lightning
def test_readme_lightning_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    from readme_blocks import run_block

    monkeypatch.chdir(tmp_path)
    ns = run_block("PyTorch Lightning")
    metrics = ns["trainer"].logged_metrics
    assert float(metrics["decorrelation/neurons"]) == 69.0  # 64 ReLUs + 5 logits
    assert float(metrics["decorrelation/penalty"]) > 0
    assert ns["trainer"].global_step == 4  # 8 batches, accumulated in pairs
    assert "decorrelation/penalty" in capsys.readouterr().out


@pytest.mark.slow
@needs_transformers
@needs_accelerate
def test_readme_hf_snippet_runs_as_written(tmp_path, monkeypatch):
    from readme_blocks import run_block

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    ns = run_block("Hugging Face Trainer")
    logs = [h for h in ns["trainer"].state.log_history if "loss" in h]
    assert logs and all(h["decorrelation/neurons"] == 256.0 for h in logs)


LIGHTNING_DDP_WORKER = r"""
import os, sys, copy, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
import lightning.pytorch as L
from test_integrations import _Net, _loaders, WEIGHT
from topodecorr.integrations.lightning import DecorrelationCallback

class Grab(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.state = copy.deepcopy(pl_module.state_dict())
        self.batch = [t.clone() for t in batch]
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}

grab = Grab()
trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=2, strategy="ddp", num_nodes=1,
                    callbacks=[DecorrelationCallback(penalty="t1", weight=WEIGHT), grab], logger=False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
trainer.fit(_Net(), _loaders(batch=16)[0])
torch.save({"state": grab.state, "batch": grab.batch, "grads": grab.grads},
           sys.argv[2] + "." + str(trainer.global_rank))
"""


@pytest.mark.slow
@needs_lightning
def test_lightning_ddp_gradient_is_that_of_the_global_batch_penalty(tmp_path):
    """Two CPU ranks (gloo): DDP's averaged gradient = mean task gradient + weight * grad T1(global batch)."""
    import torch.distributed as dist
    from processes import free_port, wait_all

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    here = os.path.dirname(os.path.abspath(__file__))
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "GROUP_RANK")}
        env.update(OMP_NUM_THREADS="1", LOCAL_RANK=str(rank), NODE_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        procs.append(subprocess.Popen([sys.executable, "-c", LIGHTNING_DDP_WORKER, here, str(tmp_path / "res")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    wait_all(procs, 300)
    res = [torch.load(tmp_path / f"res.{r}") for r in range(2)]
    torch.testing.assert_close(res[0]["grads"], res[1]["grads"])  # DDP: the same gradient on every rank
    module = _Net()
    module.load_state_dict(res[0]["state"])
    hs, outs, task = [], [], 0.0
    for r in res:
        x, y = r["batch"]
        h = module.net[1](module.net[0](x))
        out = module.net[2](h)
        hs.append(h)
        outs.append(out)
        task = task + F.cross_entropy(out, y) / 2  # DDP averages the ranks' task gradients
    assert not torch.equal(res[0]["batch"][0], res[1]["batch"][0])  # each rank had its own shard
    (task + WEIGHT * _by_hand_t1([torch.cat(hs), torch.cat(outs)])).backward()
    for name, p in module.named_parameters():
        torch.testing.assert_close(res[0]["grads"][name], p.grad, rtol=1e-5, atol=1e-6)
    # per-shard penalties (no gather) would give a different gradient: the check can fail
    module.zero_grad()
    for r in res:
        x, y = r["batch"]
        h = module.net[1](module.net[0](x))
        out = module.net[2](h)
        ((F.cross_entropy(out, y) + WEIGHT * _by_hand_t1([h, out])) / 2).backward()
    assert max(float((res[0]["grads"][n] - p.grad).abs().max()) for n, p in module.named_parameters()) > 1e-4
