"""The one home of "which tensors are neurons" and a capture that stays right in real training code.

Forwards that raised, second forwards, activation checkpointing (reentrant and not), read-only
settings, options checked without a model, and the warnings of small or dead clouds.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import topodecorr as td
from topodecorr.capture import Settings, check_options
from topodecorr.neurons import Recorder, check_layers, resolve_layers


class Block(nn.Module):
    """Linear -> ReLU -> Linear: the captured ReLU is not the block's last op."""

    def __init__(self, d=6, h=10):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, ckpt=None):
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(6, 3)
        self.ckpt = ckpt  # None, "reentrant" or "non-reentrant"
        self.fail = False

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            if self.ckpt is None:
                h = b(h)
            else:
                h = checkpoint(b, h, use_reentrant=self.ckpt == "reentrant")
            if self.fail:
                raise KeyError("boom")
        return self.head(h)


def _net(ckpt=None):
    torch.manual_seed(0)
    return Net(ckpt)


def _step(net, x, y, steps=2, **kw):
    """Penalties and gradients of a few steps (with a plain SGD update between them)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = []
    with td.Decorrelation(net, weight=1.0, **kw) as reg:
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            p = reg.penalty()
            (loss + p).backward()
            out.append((p.detach(), [q.grad.clone() for q in net.parameters()], reg.last_stats.neurons))
            opt.step()
    return out


# -- activation checkpointing ---------------------------------------------------------------------


@pytest.mark.parametrize("ckpt", ["non-reentrant", "reentrant"])
def test_checkpointing_gives_the_penalty_and_gradients_without_it(ckpt):
    x, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3
    plain = _step(_net(), x, y, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        checked = _step(_net(ckpt), x, y, 3)
    for (p, g, n), (q, h, m) in zip(plain, checked):
        assert n == m == 6 + 10 + 10 + 3  # the recompute in backward() added no neuron
        torch.testing.assert_close(q, p)
        for a, b in zip(h, g):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the penalty's share of the gradient is far above the tolerance: the comparison can fail
    task = _net()
    nn.functional.cross_entropy(task(x), y).backward()
    assert max(float((a - t.grad).abs().max()) for a, t in zip(plain[0][1], task.parameters())) > 1e-2


def test_reentrant_checkpointing_needs_the_hooks_until_backward():
    net = _net("reentrant")
    x, y = torch.randn(16, 5), torch.arange(16) % 3
    with td.Decorrelation(net) as reg:
        loss = nn.functional.cross_entropy(net(x), y) + reg.penalty()
    with pytest.raises(RuntimeError, match=r"the penalty's gradient reached a layer of a reentrant activation "
                                           r"checkpoint after the regulariser's hooks were removed"):
        loss.backward()


def test_a_layer_run_without_gradients_inside_a_training_forward_is_refused():
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Sequential(nn.Linear(5, 6), nn.ReLU()), nn.Linear(6, 3)

        def forward(self, x):
            with torch.no_grad():  # a frozen feature extractor
                h = self.body(x)
            return self.head(h)

    m = Frozen()
    with td.Decorrelation(m) as reg:
        with pytest.raises(RuntimeError, match=r"layer 'body.1' ran without gradients inside a training forward "
                                               r"of the model \(under torch.no_grad\(\), e.g. a frozen part.*"
                                               r"leave it out with layers=\[...\]"):
            m(torch.randn(8, 5))
        assert reg.captured_activations() == []
    with td.Decorrelation(m, layers=["head"]) as reg:
        m(torch.randn(8, 5))
        assert reg.penalty().requires_grad


def test_recompute_signal_is_the_autograd_engine():
    seen = []
    net = _net("non-reentrant")
    net.blocks[0].act.register_forward_hook(lambda m, i, o: seen.append(torch._C._current_graph_task_id()))
    net(torch.randn(4, 5)).sum().backward()
    assert seen[0] == -1 and seen[1] != -1  # the forward, then its recompute inside backward()


# -- forwards that raised, second forwards ---------------------------------------------------------


def test_a_forward_that_raised_leaves_nothing_behind():
    net = _net()
    x = torch.randn(16, 5)
    with td.Decorrelation(net, weight=1.0) as reg:
        net.fail = True
        with pytest.raises(KeyError):
            net(x)
        assert reg.captured_activations() == []
        with pytest.raises(RuntimeError, match="no activations were captured"):
            reg.penalty()
        net.fail = False
        net(x[:8])  # another batch size: no "pooled=True ... samples" error from the partial capture
        p = reg.penalty()
    assert reg.last_stats.neurons == 29
    with td.Decorrelation(net, weight=1.0) as ref:
        net(x[:8])
        torch.testing.assert_close(p, ref.penalty())


def _replicate(module: nn.Module) -> nn.Module:
    """nn.parallel.replicate without devices: every module copied as DataParallel copies it."""
    copy = module._replicate_for_data_parallel()
    copy._parameters = dict(module._parameters)  # DataParallel broadcasts them; here they are shared
    for name, child in module._modules.items():
        copy._modules[name] = _replicate(child)
    return copy


def test_data_parallel_replicas_are_refused_with_the_reason_and_the_remedy():
    """nn.DataParallel's per-device copies run in threads on slices of the batch (they used to give
    the misleading "second training forward" error); with no devices it is the model itself: fine."""
    net = _net()
    x = torch.randn(16, 5)
    with td.Decorrelation(nn.DataParallel(net)) as reg:  # CPU: DataParallel just calls the module
        nn.DataParallel(net)(x)
        assert torch.isfinite(reg.penalty())
    for hooked in (net, nn.DataParallel(net)):  # the model or its wrapper, as users pass them
        with td.Decorrelation(hooked):
            replica = _replicate(net)  # what DataParallel runs on each device
            with pytest.raises(RuntimeError, match=r"nn.DataParallel runs a copy of the model per device.*"
                                                   r"Use DistributedDataParallel"):
                replica(x)
    wrapper = nn.DataParallel(net)
    wrapper.device_ids = [0, 1]  # as on a two-GPU machine
    with pytest.raises(ValueError, match="nn.DataParallel runs a copy of the model per device"):
        td.Decorrelation(wrapper)


def test_a_second_training_forward_before_penalty_is_a_clear_error():
    net = _net()
    x = torch.randn(16, 5)
    with td.Decorrelation(net) as reg:
        net(x)
        with pytest.raises(RuntimeError, match=r"a second training forward of the model ran before penalty\(\) "
                                               r"used the first one's activations.*torch.no_grad\(\) or in eval\(\)"):
            net(x[:4])
        with torch.no_grad():  # an extra forward that is not captured: fine
            net(x)
        net(x)
        net.eval()
        net(x)  # evaluation in the middle: fine
        net.train()
        assert torch.isfinite(reg.penalty())
        net(x)  # a new step
        assert torch.isfinite(reg.penalty())


# -- one home: resolution, recorder, probe ----------------------------------------------------------


def test_layer_options_are_checked_without_a_model():
    assert check_layers("auto") == "auto"
    assert check_layers("net.1") == ("net.1",)
    relu = nn.ReLU()
    assert check_layers([relu, "head"]) == (relu, "head")
    with pytest.raises(ValueError, match="layers is empty"):
        check_layers([])
    with pytest.raises(TypeError, match="a layer must be an nn.Module or a name pattern, got int"):
        check_layers([3])
    with pytest.raises(TypeError, match="unexpected keyword argument 'per_layer'"):
        check_options(per_layer=3)
    with pytest.raises(TypeError, match="drop model="):
        check_options(model=relu)
    assert check_options(layers=["net.*"], mode="channel").layers == ("net.*",)


def test_repeated_calls_are_named_and_the_output_keeps_its_layer_name():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.relu = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.relu(self.fc(self.relu(x)))

    m = Twice()
    with Recorder(m, resolve_layers(m, "auto")) as rec:
        m(torch.randn(3, 4))
        recs = rec.take()
    assert [(r.name, r.is_output) for r in recs] == [("relu", False), ("relu#2", True)]


def test_records_know_the_recorded_forward_they_belong_to():
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with Recorder(m, resolve_layers(m, "auto"), needs_grad=True) as rec:
        m(torch.randn(5, 4))
        assert rec.step == 0 and {r.step for r in rec.take()} == {0}
        with torch.no_grad():
            m(torch.randn(5, 4))  # not recorded: does not count
        assert rec.forwards == 1 and not rec.records
        m(torch.randn(5, 4))
        recs = rec.take()
        assert rec.step == 1 and [r.step for r in recs] == [1, 1] and [r.name for r in recs] == ["1", "output"]


def test_harness_probe_follows_the_training_rule():
    from topodecorr.experiments.train import _probe_activations

    class Functional(nn.Module):  # F.relu only: the rule captures the Linear outputs, then the logits
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 7), nn.Linear(7, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    m = Functional()
    acts = _probe_activations(m.eval(), torch.randn(9, 4), "all", 1.0)
    assert [a.shape[1] for a in acts] == [7, 3]  # the old probe saw the logits only
    with td.Decorrelation(m.train(), weight=1.0) as reg:
        m(torch.randn(9, 4))
        reg.penalty()
    assert reg.last_stats.neurons == 10


def test_probe_records_the_layer_widths_the_report_needs():
    from topodecorr.experiments.config import TrainConfig
    from topodecorr.experiments.train import probe_deaths

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 5), nn.GELU(), nn.Linear(5, 3))
    probe = probe_deaths(net, torch.randn(32, 4), TrainConfig())
    assert probe["widths"] == [9, 5, 3] and probe["neurons"] == 17
    assert probe["min_death"] == pytest.approx(float(probe["deaths"].min()))


def test_report_reads_the_layer_widths_from_the_store():
    from topodecorr.experiments.report import _layer_layout

    row = {"config": "{}", "metrics": json.dumps({"neurons": 30, "layer_widths": [12, 8, 10]})}
    cuts, names = _layer_layout(row, {}, 30)  # no network configuration needed
    assert cuts == [12, 20] and names == ["h1", "h2", "out"]
    assert "stored 31" in _layer_layout(dict(row, metrics=json.dumps({"neurons": 31, "layer_widths": [12, 8, 10]})),
                                        {}, 30)


# -- settings ------------------------------------------------------------------------------------


def test_settings_are_read_only_but_the_weight_and_attached_is_public():
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    reg = td.Decorrelation(m, weight=0.5)
    for name, value in [("pooled", False), ("mode", "channel"), ("every", 2), ("penalty_name", "t2")]:
        with pytest.raises(AttributeError, match=f"Decorrelation.{name} is fixed when the regulariser is built"):
            setattr(reg, name, value)
    assert reg.pooled is True and reg.settings.pooled is True
    reg.weight = 2.0
    assert reg.weight == 2.0 and reg.settings.weight == 2.0
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        reg.weight = -1.0
    assert not reg.attached
    with reg:
        assert reg.attached
        m(torch.randn(8, 4))
        p = reg.penalty()
    assert not reg.attached and p.shape == ()
    # the signature's defaults are the settings' defaults (one list of options)
    import inspect

    sig = inspect.signature(td.Decorrelation.__init__).parameters
    for f in Settings.__dataclass_fields__.values():
        assert sig[f.name].default == f.default, f.name


def test_unknown_backend_is_refused_when_built():
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    with pytest.raises(ValueError, match=r"unknown backend 'nonsense'; choose one of \('auto', 'boruvka', "
                                         r"'numba', 'numpy'\)"):
        td.Decorrelation(m, backend="nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        check_options(backend="nonsense")


# -- clouds too large, too few samples, all dead ------------------------------------------------------


def test_a_pooled_cloud_above_max_neurons_is_refused_with_the_remedies():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    x = torch.randn(4, 3, 16, 16)
    with td.Decorrelation(conv, max_neurons=1000) as reg:
        conv(x)
        with pytest.raises(ValueError, match=r"the pooled point cloud has 4098 neurons after sampling \(layers: "
                                             r"\{'1': 2048, '3': 2048, 'output': 2\}\).*mode='channel'.*"
                                             r"layers=\[...\].*sampling='importance'.*max_neurons"):
            reg.penalty()
    with td.Decorrelation(conv, max_neurons=1000, sampling="importance", fraction=0.01) as reg:
        conv(x)
        assert torch.isfinite(reg.penalty())  # 20 + 20 + 2 neurons after sampling
        assert reg.last_stats.neurons == 42
    with td.Decorrelation(conv, mode="channel", pooled=False, layers=["1", "3"], max_neurons=1000) as reg:
        conv(x)
        assert torch.isfinite(reg.penalty())
    assert td.Decorrelation(conv).settings.max_neurons == 8192


def test_tiny_batches_warn_once():
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    with td.Decorrelation(m) as reg:
        with pytest.warns(RuntimeWarning, match=r"a point cloud has only 3 samples at step 0: with 2 samples every "
                                                r"correlation is \+1 or -1 \(every death 0\)"):
            m(torch.randn(3, 4))
            reg.penalty()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            m(torch.randn(2, 4))
            reg.penalty()  # once per regulariser
            m(torch.randn(16, 4))
            reg.penalty()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with td.Decorrelation(m) as reg:  # 4 samples: no warning
            m(torch.randn(4, 4))
            reg.penalty()


@pytest.mark.parametrize("penalty", ["t1", "t2", "mean_abs_corr"])
def test_a_step_where_every_neuron_is_dead_warns_once(penalty):
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU())
    with torch.no_grad():
        m[0].bias.fill_(-100.0)  # nothing fires: every captured neuron is constant
    with td.Decorrelation(m, penalty=penalty) as reg:
        with pytest.warns(RuntimeWarning, match=r"every captured neuron \(11\) is dead at step 0"):
            m(torch.randn(16, 4))
            reg.penalty()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            m(torch.randn(16, 4))
            reg.penalty()
    with torch.no_grad():
        m[0].bias.fill_(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with td.Decorrelation(m, penalty=penalty) as reg:  # live neurons: no warning
            m(torch.randn(16, 4))
            reg.penalty()


# -- torch.compile ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_trap_of_another_instance_is_warned_at_attach_and_the_remedy_works():
    def mk():
        torch.manual_seed(5)
        return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))

    x = torch.randn(16, 5)
    with td.Decorrelation(mk(), weight=1.0) as ref:  # eager reference
        ref.model(x)
        want = ref.penalty()
    try:
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fresh = torch.compile(mk(), backend="eager")
            td.Decorrelation(fresh).attach().close()  # nothing compiled yet: no warning
        other = torch.compile(mk(), backend="eager")
        other(x)  # another instance of the class, compiled and run without hooks
    except Exception as e:  # pragma: no cover - compile unsupported here
        pytest.skip(f"torch.compile unavailable: {e}")
    cm = torch.compile(mk(), backend="eager")
    reg = td.Decorrelation(cm, weight=1.0)
    with pytest.warns(RuntimeWarning, match=r"attached to a torch.compile'd model while dynamo already holds compiled "
                                             r"graphs.*Call torch._dynamo.reset\(\) right after attaching"):
        reg.attach()
    cm(x)
    with pytest.raises(RuntimeError, match=r"no activations were captured.*torch._dynamo.reset\(\) right after"):
        reg.penalty()
    torch._dynamo.reset()  # the remedy
    cm(x)
    torch.testing.assert_close(reg.penalty(), want)
    reg.close()
    torch._dynamo.reset()


def test_inspect_and_the_pipeline_share_the_constant_neuron_rule():
    g = torch.Generator().manual_seed(6)
    noise = torch.randn(256, 4, generator=g, dtype=torch.float64)
    # float32 columns around 1e6: a spread of 0.5 is signal (2 eps |mean| = 0.24), 0.05 is not;
    # (inspect once had its own rule, 8 eps max|x|, which called both dead)
    x = (1e6 + noise * torch.tensor([0.5, 0.05, 1.0, 0.0], dtype=torch.float64)).float()
    _, dead = td.normalize_activations(x)
    report = td.inspect(nn.Identity(), [x[:100], x[100:]])
    assert dead.tolist() == [False, True, False, True]
    assert report.layers[0].dead_neurons == (("output", 1), ("output", 3))
