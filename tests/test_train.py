"""One training run: protocol, determinism, checkpoints (weights_only) and resume, divergence."""

from __future__ import annotations

import pickle
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from topodecorr.experiments.config import ConfigError, TrainConfig
from topodecorr.experiments.train import RunSpec, load_checkpoint, probe_deaths, train_run


def _data(n=160, seed=0):
    """A small separable 4-class problem shaped like an 8x8 image."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(4, 1, 8, 8, generator=g)
    def part(m):
        y = torch.randint(0, 4, (m,), generator=g)
        X = (centres[y] + 0.15 * torch.randn(m, 1, 8, 8, generator=g)).clamp(0, 1)
        return X.float(), y.long()
    return SimpleNamespace(train=part(n), val=part(64), test=part(64), input_shape=(1, 8, 8), num_classes=4,
                           name="toy", source="test", sizes={})


@pytest.fixture(scope="module")
def data():
    return _data()


def _spec(penalty="t1", weight=1e-3, seed=0, **train):
    cfg = dict(max_epochs=4, patience=10, batch_size=32, decay_steps=7, probe_batch=64)
    cfg.update(train)
    return RunSpec(dataset="digits", network="mlp", model="mlp", penalty=penalty, weight=weight, seed=seed,
                   model_params=(), train=TrainConfig(**cfg), keep_correlation=True)


@pytest.fixture(autouse=True)
def _small_mlp(monkeypatch):
    """The paper's MLP is larger than needed here; train a small one through the same builder hook."""
    import topodecorr.experiments.models as models

    def build(name, input_shape, num_classes, **params):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 24), nn.ReLU(),
                             nn.Linear(24, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, num_classes))

    monkeypatch.setattr(models, "build_model", build)


@pytest.mark.slow
def test_run_learns_and_records_every_epoch(data):
    res = train_run(_spec(max_epochs=6), data=data)
    assert res["status"] == "done" and res["epochs"] == 6 and len(res["history"]) == 6
    assert res["val_acc"] > 0.5 and res["test_acc"] > 0.5  # 4 classes: chance is 0.25
    h = res["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert all(e["penalty"] is not None and e["penalty"] > 0 for e in h)
    assert h[0]["neurons"] == 24 + 16 + 4 and res["deaths"].shape == (43,)
    assert 0 <= res["deaths"].min() and res["deaths"].max() <= 1
    assert res["correlation"].shape == (44, 44)
    # staircase decay: 160 / 32 = 5 steps per epoch, decay every 7 steps; lr at the epoch's first step
    # (steps 0, 5, 10, 15 -> floor(step / 7) = 0, 0, 1, 2)
    assert [e["lr"] for e in h[:4]] == pytest.approx([0.01, 0.01, 0.01 * 0.95, 0.01 * 0.95**2])
    assert res["best_epoch"] == int(np.argmin([e["val_loss"] for e in h]))
    assert res["val_loss"] == pytest.approx(min(e["val_loss"] for e in h), rel=1e-5)  # best weights restored


def test_probe_matches_an_independent_mst(data):
    torch.manual_seed(0)
    import topodecorr.experiments.models as models
    from scipy.sparse.csgraph import minimum_spanning_tree

    model = models.build_model("mlp", (1, 8, 8), 4)
    x = data.val[0][:64]
    out = probe_deaths(model, x, TrainConfig())
    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o.flatten(1))) for m in model if isinstance(m, nn.ReLU)]
    model.eval()
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    a = torch.cat(acts + [logits], 1).double().numpy()
    alive = a.std(axis=0) > 1e-12
    c = np.corrcoef(a[:, alive], rowvar=False)
    d = 1 - np.abs(c) + 1e-9  # offset: scipy drops zero-weight edges
    np.fill_diagonal(d, 0)
    mst = np.sort(minimum_spanning_tree(d).data) - 1e-9
    n_dead = int((~alive).sum())
    assert out["dead"] == n_dead
    # a dead neuron joins the tree at death 1; the live ones form scipy's tree
    np.testing.assert_allclose(out["deaths"][: len(mst)], mst, atol=1e-4)
    np.testing.assert_allclose(out["deaths"][len(mst):], 1.0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("penalty, weight", [("none", 0.0), ("l1", 1e-4), ("l2", 1e-3), ("mean_abs_corr", 0.1), ("decov", 0.1), ("t2", 0.1)])
def test_every_penalty_trains_and_changes_the_result(data, penalty, weight):
    base = train_run(_spec("none", 0.0, max_epochs=2), data=data)
    res = train_run(_spec(penalty, weight, max_epochs=2), data=data)
    assert res["status"] == "done"
    if penalty == "none":
        assert res["history"] == [dict(h, epoch_s=r["epoch_s"]) for h, r in zip(base["history"], res["history"])]
    else:
        assert res["history"][-1]["train_loss"] != base["history"][-1]["train_loss"]
        assert res["history"][0]["penalty"] != 0  # T2 may be negative


def _strip_times(history):
    return [{k: v for k, v in e.items() if k != "epoch_s"} for e in history]


@pytest.mark.slow
def test_seeded_runs_repeat_and_resume_from_a_checkpoint(data, tmp_path):
    full = train_run(_spec(max_epochs=5), data=data)
    again = train_run(_spec(max_epochs=5), data=data)
    assert _strip_times(full["history"]) == _strip_times(again["history"])
    other = train_run(_spec(seed=1, max_epochs=5), data=data)
    assert _strip_times(other["history"]) != _strip_times(full["history"])

    ckpt = tmp_path / "run.pt"

    class Kill(Exception):
        pass

    def stop_after_two(record):
        if record["epoch"] == 1:
            raise Kill

    with pytest.raises(Kill):
        train_run(_spec(max_epochs=5), ckpt, data=data, on_epoch=stop_after_two)
    state = load_checkpoint(ckpt)  # weights_only=True
    assert state["epoch"] == 1 and len(state["history"]) == 2
    with pytest.raises(pickle.UnpicklingError):
        _refuse_code(tmp_path)
    resumed = train_run(_spec(max_epochs=5), ckpt, data=data)
    assert resumed["resumed_from"] == 2
    assert _strip_times(resumed["history"]) == _strip_times(full["history"])
    assert resumed["test_acc"] == full["test_acc"] and resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-6)
    np.testing.assert_array_equal(resumed["deaths"], full["deaths"])
    # a checkpoint of a different run is ignored, not resumed
    fresh = train_run(_spec(max_epochs=5, seed=1), ckpt, data=data)
    assert fresh["resumed_from"] is None


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def _refuse_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, path)
    load_checkpoint(path)  # raises: weights_only refuses arbitrary objects


def test_divergence_is_recorded_not_hidden(data):
    res = train_run(_spec("l2", 1e30, max_epochs=3), data=data)
    assert res["status"] == "diverged" and "non-finite" in res["error"]
    assert res.get("test_acc") is None and res["deaths"] is None
    assert res["epochs"] == len(res["history"]) < 3


def test_bad_specs_raise_clear_errors():
    with pytest.raises(ConfigError, match="unknown penalty"):
        _spec("t3")
    with pytest.raises(ConfigError, match="weight: must be >= 0"):
        _spec("t1", -1.0)
    with pytest.raises(ConfigError, match="needs a weight > 0"):
        _spec("t1", 0.0)
    spec = _spec()
    assert RunSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.slow
def test_early_stopping_stops_after_patience(data):
    res = train_run(_spec("none", 0.0, max_epochs=60, patience=2, lr=0.5, momentum=0.0, nesterov=False), data=data)
    h = res["history"]
    best = int(np.argmin([e["val_loss"] for e in h]))
    assert res["status"] == "done"
    assert len(h) == best + 1 + 2 or len(h) == 60


@pytest.mark.slow
def test_progress_without_a_terminal_is_one_line_per_epoch(data, capsys):
    """stderr is not a terminal here (captured): a line per epoch instead of a tqdm bar."""
    res = train_run(_spec(max_epochs=3), data=data, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    for e, (line, rec) in enumerate(zip(lines, res["history"])):
        assert re.fullmatch(
            rf"mlp t1 0\.001 s0: epoch {e + 1}/3 train loss \d+\.\d{{4}} val loss \d+\.\d{{4}} "
            rf"val acc \d\.\d{{3}} \(\d+\.\d s\)", line), line
        assert f"val loss {rec['val_loss']:.4f}" in line
    # sweeps print one line per run instead (their driver does), and quiet runs print nothing
    train_run(_spec(max_epochs=2), data=data, progress=True, epoch_lines=False)
    train_run(_spec(max_epochs=2), data=data, progress=False)
    assert capsys.readouterr().err == ""


def test_sweep_penalties_resolve_in_the_registry():
    """config's torch-free label lists agree with the penalty registry the loop dispatches through."""
    from topodecorr import penalties
    from topodecorr.experiments.config import DECORRELATION_PENALTIES, PENALTIES, PENALTY_VARIANTS
    from topodecorr.experiments.train import penalty_of

    assert penalty_of("none") == (None, "keep")
    hooked = []
    for label in PENALTIES[1:]:
        entry, dead = penalty_of(label)
        assert entry is penalties.REGISTRY[PENALTY_VARIANTS.get(label, (label,))[0]]
        assert dead == ("drop" if label == "t2_live" else "keep")
        if entry.kind != "parameters":
            hooked.append(label)
    assert tuple(hooked) == DECORRELATION_PENALTIES
    assert set(penalties.names()) <= set(PENALTIES)  # every registered penalty can be swept
    with pytest.raises(ConfigError, match="unknown penalty 't3'"):
        penalty_of("t3")


# -- checkpoints that cannot be read or written ------------------------------------------------------


def _truncated(path, data):
    train_run(_spec(max_epochs=1), path, data=data)  # a real checkpoint, cut in half
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("make,why", [
    (lambda p, d: p.write_bytes(b""), "EOFError"),
    (lambda p, d: p.write_bytes(b"\x00garbage" * 100), "UnpicklingError"),
    (_truncated, "(?:OSError|RuntimeError)"),  # torch reads a cut zip archive one way or the other
    (lambda p, d: torch.save({"model": {}}, p), "ValueError: not a run checkpoint: no identity, epoch"),
], ids=["empty", "garbage", "truncated", "foreign"])
def test_unreadable_checkpoint_is_set_aside_and_the_run_restarts(data, tmp_path, make, why):
    path = tmp_path / "run.pt"
    make(path, data)
    before = path.read_bytes()
    notes = []
    res = train_run(_spec(max_epochs=2), path, data=data, log=notes.append)
    assert res["status"] == "done" and res["resumed_from"] is None and res["epochs"] == 2
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.pt.unreadable-")]
    assert len(aside) == 1 and aside[0].read_bytes() == before  # renamed, never deleted
    assert load_checkpoint(path)["epoch"] == 1  # the new run's own checkpoint
    assert len(notes) == 1
    assert re.fullmatch(rf"checkpoint {re.escape(str(path))} is unreadable \({why}[^)]*\); set aside as "
                        rf"{re.escape(aside[0].name)}, and the run restarts from scratch", notes[0]), notes[0]
    # the same result as a run that never met the bad file
    fresh = train_run(_spec(max_epochs=2), data=data)
    assert res["val_loss"] == pytest.approx(fresh["val_loss"], rel=1e-6)


@pytest.mark.slow
def test_another_runs_checkpoint_is_set_aside_not_overwritten(data, tmp_path):
    path = tmp_path / "run.pt"
    train_run(_spec(seed=1, max_epochs=1), path, data=data)
    before = path.read_bytes()
    notes = []
    res = train_run(_spec(seed=2, max_epochs=1), path, data=data, log=notes.append)
    assert res["status"] == "done" and res["resumed_from"] is None
    (aside,) = [p for p in tmp_path.iterdir() if ".other-run-" in p.name]
    assert aside.read_bytes() == before
    assert notes == [f"checkpoint {path} belongs to another run (another configuration); set aside as "
                     f"{aside.name}, and this run starts from scratch"]


def test_unwritable_checkpoint_names_the_file(data, tmp_path):
    from topodecorr.experiments.train import CheckpointError
    from topodecorr.experiments.store import StoreError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the checkpoint folder should be")
    path = blocker / "run.pt"
    with pytest.raises(CheckpointError) as err:
        train_run(_spec(max_epochs=1, probe_batch=8), path, data=_data(n=40))
    assert str(err.value).startswith(f"cannot write the checkpoint {path}: ")
    assert str(err.value).endswith(f"; make the folder {blocker} writable, or choose another place for the checkpoints")
    assert isinstance(err.value, StoreError)  # the command line prints it as one line, status 2
