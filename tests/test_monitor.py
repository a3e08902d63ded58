"""monitor.StatsLogger: a Decorrelation's step statistics to a real SummaryWriter or a callable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import topodecorr as td
from topodecorr.monitor import StatsLogger, step_statistics


def _train(reg, model, steps, record=None):
    """A plain loop; ``record`` collects (step, value, StepStats, deaths) after every penalty() call."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with reg:
        for _ in range(steps):
            x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
            out = model(x)
            p = reg.penalty()
            if record is not None:
                record.append((reg.last_stats.step, float(p.detach()), reg.last_stats, reg.last_deaths))
            loss = F.cross_entropy(out, y) + p
            opt.zero_grad()
            loss.backward()
            opt.step()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 3))


@pytest.mark.slow
def test_summary_writer_gets_scalars_and_a_death_histogram_every_k_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    model = _model()
    seen = []
    reg = td.Decorrelation(model, penalty="t1", weight=0.01, log=StatsLogger(writer, every=2))
    _train(reg, model, 5, seen)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    expected = {k: v for k, v in enumerate(seen) if k % 2 == 0}
    for key in ("penalty", "neurons", "dead", "min_death", "mean_death", "max_death", "skipped"):
        events = acc.Scalars(f"decorrelation/{key}")
        assert [e.step for e in events] == [0, 2, 4]
        for e in events:
            step, value, stats, _ = expected[e.step]
            want = value if key == "penalty" else getattr(stats, key)
            assert e.value == pytest.approx(want, rel=1e-6, abs=1e-7)
    hist = acc.Histograms("decorrelation/deaths")
    assert [h.step for h in hist] == [0, 2, 4]
    for h in hist:
        deaths = expected[h.step][3]
        assert h.histogram_value.num == deaths.numel() == 12  # 10 ReLUs + 3 logits pooled: 13 - 1 deaths
        assert h.histogram_value.min == pytest.approx(float(deaths.min()), rel=1e-6)
        assert h.histogram_value.max == pytest.approx(float(deaths.max()), rel=1e-6)
        assert h.histogram_value.sum == pytest.approx(float(deaths.sum()), rel=1e-5)


@pytest.mark.slow
def test_callable_gets_every_step_statistics():
    model = _model()
    got, seen = [], []
    reg = td.Decorrelation(model, penalty="t2", weight=0.1, log=lambda step, stats: got.append((step, stats)))
    _train(reg, model, 3, seen)
    assert [s for s, _ in got] == [0, 1, 2]
    for (step, stats), (_, value, ref, _) in zip(got, seen):
        assert stats["penalty"] == pytest.approx(value)
        assert stats["neurons"] == ref.neurons == 13 and stats["dead"] == ref.dead
        assert (stats["min_death"], stats["mean_death"], stats["max_death"]) == (
            ref.min_death, ref.mean_death, ref.max_death)
        assert all(isinstance(v, (int, float)) for v in stats.values())


@pytest.mark.slow
def test_penalties_without_a_tree_report_no_deaths():
    model = _model()
    got = []
    writes = []

    class Writer:  # a SummaryWriter stand-in that records calls
        def add_scalar(self, tag, value, step):
            writes.append(("scalar", tag, step))

        def add_histogram(self, tag, values, step):
            writes.append(("histogram", tag, step))

    reg = td.Decorrelation(model, penalty="decov", weight=0.1, log=StatsLogger(Writer(), every=3))
    _train(reg, model, 4)
    assert {t for kind, t, _ in writes} == {
        "decorrelation/penalty", "decorrelation/neurons", "decorrelation/dead", "decorrelation/skipped"}
    assert sorted({s for _, _, s in writes}) == [0, 3]
    assert not any(kind == "histogram" for kind, _, _ in writes)
    stats = step_statistics(reg)
    # one shape: the recorded weighted penalty is part of every step's statistics
    assert "min_death" not in stats and stats["neurons"] == 13
    assert stats["penalty"] == reg.last_stats.penalty and stats["penalty"] > 0


def test_bad_sinks_are_refused():
    with pytest.raises(TypeError, match="SummaryWriter"):
        StatsLogger("runs/")
    with pytest.raises(ValueError, match="every"):
        StatsLogger(print, every=0)
    with pytest.raises(TypeError, match="SummaryWriter"):
        td.Decorrelation(_model(), log=42)
    reg = td.Decorrelation(_model())
    assert step_statistics(reg) is None  # no step yet


@pytest.mark.slow
def test_readme_logging_snippet_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from readme_blocks import run_block

    monkeypatch.chdir(tmp_path)
    ns = run_block("Logging the statistics")
    acc = EventAccumulator(str(tmp_path / "runs" / "decorrelation"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("decorrelation/neurons")] == [0, 10, 20, 30, 40]
    assert {e.value for e in acc.Scalars("decorrelation/neurons")} == {69.0}
    assert "decorrelation/deaths" in acc.Tags()["histograms"]
    assert ns["reg"].last_stats.step == 49
