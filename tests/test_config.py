"""Sweep configuration: defaults are the paper's, TOML parsing, validation, presets."""

from __future__ import annotations

import json
import math
import re

import pytest

from topodecorr.experiments.config import (
    PAPER_WEIGHTS,
    PENALTIES,
    ConfigError,
    SweepConfig,
    TrainConfig,
    list_presets,
    load_preset,
    load_sweep,
    parse_sweep,
)


def test_train_defaults_are_the_papers():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.momentum, cfg.nesterov, cfg.lr_decay, cfg.decay_steps) == (0.01, 0.9, True, 0.95, 3520)
    assert (cfg.batch_size, cfg.patience, cfg.max_epochs, cfg.sampling, cfg.fraction) == (256, 20, 1200, "all", 1.0)
    assert PAPER_WEIGHTS == (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 5.0, 10.0, 100.0)
    assert PENALTIES == ("none", "l1", "l2", "mean_abs_corr", "decov", "decov_layer", "act_l2", "t1", "t2", "t2_live")


def test_grid_none_runs_once_per_network_and_seed():
    cfg = parse_sweep({"dataset": "digits", "networks": ["mlp", "mlp-deep"], "penalties": ["none", "t1", "l2"],
                       "weights": [0.1, 1], "seeds": [3, 4]})
    grid = cfg.grid()
    assert len(grid) == 2 * 2 * (1 + 2 * 2)
    assert len(set(grid)) == len(grid)
    assert [g for g in grid if g[1] == "none"] == [
        ("mlp", "none", 0.0, 3), ("mlp-deep", "none", 0.0, 3), ("mlp", "none", 0.0, 4), ("mlp-deep", "none", 0.0, 4)]
    assert all(isinstance(w, float) for _, _, w, _ in grid)


def test_toml_file_round_trip(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        'dataset = "digits"\nnetworks = ["mlp", {label = "v", model = "vgg", params = {depth = 2}}]\n'
        'penalties = ["t2"]\nweights = [1e-3]\nseeds = [0]\n[train]\nmax_epochs = 7\nlr = 1\n'
    )
    cfg = load_sweep(path)
    assert cfg.train.max_epochs == 7 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.networks[1].model == "vgg" and cfg.networks[1].kwargs == {"depth": 2}
    assert parse_sweep(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"dataset": "digits", "penalties": ["t3"]}, "unknown penalty 't3'"),
        ({"dataset": "digits", "weights": [-1.0]}, "must be > 0"),
        ({"dataset": "digits", "weights": [math.nan]}, "not a finite number"),
        ({"dataset": "digits", "seeds": [-1]}, "non-negative"),
        ({"dataset": "digits", "bogus": 1}, "unknown key(s) ['bogus']"),
        ({"dataset": "digits", "train": {"lr": -0.1}}, "train.lr"),
        ({"dataset": "digits", "train": {"learning_rate": 0.1}}, "unknown key(s) ['learning_rate']"),
        ({"dataset": "digits", "train": {"max_epochs": 2.5}}, "train.max_epochs"),
        ({"dataset": "digits", "networks": ["mlp", "mlp"]}, "duplicate label"),
        ({"dataset": "digits", "networks": [{"label": "x"}]}, "needs a 'model' key"),
        ({"networks": ["mlp"]}, "missing key 'dataset'"),
        ({"dataset": "digits", "penalties": "t1"}, "expected a list"),
    ],
)
def test_bad_configs_raise_clear_errors(data, message):
    with pytest.raises(ConfigError) as info:
        parse_sweep(data, source="my.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("my.toml: ")


def test_unknown_dataset_and_network_names():
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        SweepConfig(dataset="nope").validate_names()
    with pytest.raises(ConfigError, match="unknown network 'resnet9000'"):
        parse_sweep({"dataset": "digits", "networks": ["resnet9000"]}).validate_names()


def test_toml_is_parsed_never_evaluated(tmp_path):
    path = tmp_path / "evil.toml"
    path.write_text('dataset = "__import__(\'os\').system(\'touch pwned\')"\n')
    cfg = load_sweep(path)  # a plain string, not code
    assert cfg.dataset.startswith("__import__")
    with pytest.raises(ConfigError, match="unknown dataset"):
        cfg.validate_names()
    bad = tmp_path / "bad.toml"
    bad.write_text("dataset = digits\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="cannot read sweep file"):
        load_sweep(tmp_path / "missing.toml")


def test_presets_ship_and_validate():
    names = list_presets()
    assert {"quick", "paper-fashion-mnist", "paper-mnist", "paper-cifar10"} <= set(names)
    for name in names:
        cfg = load_preset(name)
        cfg.validate_names()
        assert names[name], f"preset {name} has no description"
    quick = load_preset("quick")
    assert quick.dataset == "digits" and len(quick.seeds) >= 3 and set(quick.penalties) == {
        "none", "l1", "l2", "mean_abs_corr", "decov", "t1", "t2"}
    assert [n.model for n in quick.networks] == ["mlp", "mlp-dropout", "mlp-deep"]
    full = load_preset("paper-fashion-mnist")
    assert full.weights == PAPER_WEIGHTS and full.train == TrainConfig()
    cifar = load_preset("paper-cifar10")
    assert cifar.train.sampling == "importance" and cifar.train.fraction == 0.005
    with pytest.raises(ConfigError, match="unknown preset"):
        load_preset("nope")


def test_set_overrides_apply_and_a_bad_one_is_blamed_on_set(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('dataset = "digits"\nnetworks = ["mlp"]\n[train]\nmax_epochs = 7\n')
    cfg = load_sweep(path, ["train.max_epochs=3", "seeds=[4, 5]"], data_dir="elsewhere")
    assert (cfg.train.max_epochs, cfg.seeds, cfg.data_dir) == (3, (4, 5), "elsewhere")
    with pytest.raises(ConfigError) as info:
        load_sweep(path, ["seeds=[1]", "train.max_epoch=3"])
    msg = str(info.value)
    assert msg.startswith("--set train.max_epoch=3: train: unknown key(s) ['max_epoch']"), msg
    assert str(path) not in msg and "seeds" not in msg.split(":")[0]
    # two assignments that are only wrong together are both named
    pair = tmp_path / "pair.toml"
    pair.write_text('dataset = "digits"\n[train]\nnesterov = false\n')
    with pytest.raises(ConfigError, match=r"^--set train.momentum=0 --set train.nesterov=true: train.nesterov: "):
        load_sweep(pair, ["train.momentum=0", "train.nesterov=true"])
    with pytest.raises(ConfigError, match=r"^--set expects KEY=VALUE"):
        load_sweep(path, ["max_epochs"])
    with pytest.raises(ConfigError, match=r"^--set dataset.x=1: 'dataset' is not a table"):
        load_sweep(path, ["dataset.x=1"])
    # an error the file has on its own is the file's, --set or not
    path.write_text('dataset = "digits"\n[train]\nmax_epoch = 7\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: train: unknown key"):
        load_sweep(path, ["seeds=[1]"])
    # ... unless a --set repairs it
    path.write_text('dataset = "digits"\n[train]\nmax_epochs = 0\n')
    assert load_sweep(path, ["train.max_epochs=2"]).train.max_epochs == 2


def test_name_errors_name_the_file_or_the_set(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('dataset = "digits"\nnetworks = ["mlp", {label = "big", model = "resnet"}]\n')
    assert load_sweep(path).networks[1].model == "resnet"  # names are checked only on request
    with pytest.raises(ConfigError) as info:
        load_sweep(path, check_names=True)
    assert str(info.value).startswith(f"{path}: networks[1] (label 'big'): unknown network 'resnet'; choose from [")
    path.write_text('dataset = "imagenet"\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: dataset: unknown dataset 'imagenet'"):
        load_sweep(path, check_names=True)
    with pytest.raises(ConfigError, match=r"^--set dataset=nope: dataset: unknown dataset 'nope'"):
        load_preset("quick", ["dataset=nope"], check_names=True)
    path.write_text('dataset = "digits"\nnetworks = [{model = "mlp", params = {width = 3}}]\n')
    with pytest.raises(ConfigError, match=r"networks\[0\]: unknown parameter\(s\) \['width'\] for model 'mlp'"):
        load_sweep(path, check_names=True)


@pytest.mark.slow
def test_name_registries_need_no_torch():
    """The registries behind --help and the name checks import no torch (the core package does)."""
    import subprocess
    import sys

    code = (
        "import sys, importlib.util, pathlib\n"
        "from topodecorr.experiments import config\n"
        "config.check_network(config.parse_network('mlp-deep'))\n"
        "config.check_dataset_name('digits')\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


# -- two-stage sweeps and per-seed splits ------------------------------------------------------

STAGED = {
    "dataset": "digits", "networks": ["mlp", "mlp-deep"], "penalties": ["none", "l2", "t1"],
    "weights": [1e-6, 1e-4, 1e-2, 1.0, 100.0], "seeds": [0, 1, 2, 3],
    "stages": {"wide_seeds": [0, 1], "neighbours": 1},
}


def _row(net, pen, w, seed, acc, loss=1.0, status="done"):
    return dict(network=net, penalty=pen, weight=w, seed=seed, status=status, val_acc=acc, val_loss=loss)


def _stage_one(best: dict[tuple[str, str], float]) -> list[dict]:
    """Finished stage-1 rows whose mean validation accuracy peaks at ``best[(net, pen)]``."""
    rows = []
    for net in ("mlp", "mlp-deep"):
        rows += [_row(net, "none", 0.0, s, 0.5) for s in (0, 1)]
        for pen in ("l2", "t1"):
            for w in STAGED["weights"]:
                for s in (0, 1):
                    rows.append(_row(net, pen, w, s, 0.9 if w == best[(net, pen)] else 0.6 + 0.01 * s))
    return rows


def test_stage_one_is_the_wide_grid_on_the_wide_seeds():
    cfg = parse_sweep(STAGED)
    grid = cfg.grid()
    assert {s for *_, s in grid} == {0, 1}
    assert len(grid) == 2 * 2 * (1 + 2 * 5)  # seeds x networks x (none + 2 penalties x 5 weights)
    assert cfg.stages.run == 1 and cfg.to_dict()["stages"] == {"wide_seeds": [0, 1], "neighbours": 1}


def test_stage_two_takes_the_best_weight_and_its_neighbours_on_every_seed():
    from topodecorr.experiments.config import selection_weights, stage_two_weights

    cfg = parse_sweep({**STAGED, "stages": {**STAGED["stages"], "run": 2}})
    best = {("mlp", "l2"): 1e-6, ("mlp", "t1"): 1e-2, ("mlp-deep", "l2"): 100.0, ("mlp-deep", "t1"): 1e-4}
    rows = _stage_one(best)
    chosen = stage_two_weights(cfg, rows)
    assert chosen == {("mlp", "l2"): (1e-6, 1e-4), ("mlp", "t1"): (1e-4, 1e-2, 1.0),
                      ("mlp-deep", "l2"): (1.0, 100.0), ("mlp-deep", "t1"): (1e-6, 1e-4, 1e-2)}
    grid = cfg.grid(rows)
    assert {s for *_, s in grid} == {0, 1, 2, 3}
    per_seed = [(n, p, w) for n, p, w, s in grid if s == 3]
    assert per_seed.count(("mlp", "none", 0.0)) == 1
    assert [w for n, p, w in per_seed if (n, p) == ("mlp", "t1")] == [1e-4, 1e-2, 1.0]
    assert len(per_seed) == 2 + 2 + 3 + 2 + 3  # none x 2 nets and the neighbourhoods
    # the report's selection: every weight until a stage-2 seed has a run, then the neighbourhoods
    stored = cfg.to_dict()
    assert selection_weights(stored, rows) is None
    assert selection_weights(stored, rows + [_row("mlp", "none", 0.0, 2, 0.5)]) == chosen
    assert selection_weights(parse_sweep({k: v for k, v in STAGED.items() if k != "stages"}).to_dict(), rows) is None


def test_stage_two_ties_divergence_and_unfinished_runs():
    from topodecorr.experiments.config import stage_two_weights

    cfg = parse_sweep({**STAGED, "networks": ["mlp"], "penalties": ["t1"], "stages": {"wide_seeds": [0], "neighbours": 0}})
    flat = [_row("mlp", "t1", w, 0, 0.8, loss=2.0) for w in STAGED["weights"]]
    assert stage_two_weights(cfg, flat) == {("mlp", "t1"): (1e-6,)}  # all tied: the smallest weight
    lower_loss = [dict(r, val_loss=0.5) if r["weight"] == 1.0 else r for r in flat]
    assert stage_two_weights(cfg, lower_loss) == {("mlp", "t1"): (1.0,)}  # ties: the lower loss
    diverged = [dict(r, status="diverged", val_acc=None, val_loss=None) if r["weight"] == 1e-6 else r for r in flat]
    assert stage_two_weights(cfg, diverged) == {("mlp", "t1"): (1e-4,)}  # diverged counts as accuracy 0
    with pytest.raises(ConfigError, match=r"1 are not \(e.g. mlp t1 100 seed 0\).*stages.run = 1"):
        stage_two_weights(cfg, flat[:-1] + [dict(flat[-1], status="pending")])
    with pytest.raises(ConfigError, match="pass the database's runs"):
        parse_sweep({**STAGED, "stages": {"wide_seeds": [0], "run": 2}}).grid()


@pytest.mark.parametrize("stages, message", [
    ({"wide_seeds": [7]}, r"stages.wide_seeds: \[7\] not among"),
    ({"wide_seeds": []}, "at least one seed"),
    ({"neighbours": 1}, "expected a list of the stage-1 seeds"),
    ({"wide_seeds": [0], "neighbours": -1}, "neighbours: must be an integer >= 0"),
    ({"wide_seeds": [0], "run": 3}, "the stage to run is 1 or 2"),
    ({"wide_seeds": [0], "seeds": 1}, r"unknown key\(s\) \['seeds'\]"),
    ([0, 1], "expected a table"),
])
def test_bad_stages_raise_clear_errors(stages, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep({**STAGED, "stages": stages})


def test_split_per_seed_and_stored_protocol_of_earlier_sweeps():
    plain = parse_sweep({"dataset": "digits", "split_seed": 3})
    assert [plain.split_seed_of(s) for s in (0, 4)] == [3, 3]
    assert "split_per_seed" not in plain.to_dict() and "stages" not in plain.to_dict()  # old databases resume
    fresh = parse_sweep({"dataset": "digits", "split_seed": 3, "split_per_seed": True, "seeds": [0, 4]})
    assert [fresh.split_seed_of(s) for s in (0, 4)] == [3, 7] and fresh.to_dict()["split_per_seed"] is True
    from topodecorr.experiments.sweep import run_specs

    assert [s.split_seed for s in run_specs(fresh) if s.penalty == "none"] == [3, 3, 3, 7, 7, 7]
    with pytest.raises(ConfigError, match="split_per_seed: must be true or false"):
        parse_sweep({"dataset": "digits", "split_per_seed": "yes"})


@pytest.mark.slow
def test_two_stages_run_into_one_database(tmp_path):
    """Stage 1 then stage 2 with --set stages.run=2: one folder, the protocol unchanged, stage 1 kept."""
    from topodecorr.experiments.config import stage_two_weights
    from topodecorr.experiments.store import ResultStore
    from topodecorr.experiments.sweep import DB_NAME, run_sweep

    path = tmp_path / "s.toml"
    path.write_text(
        'dataset = "digits"\nnetworks = [{ label = "small", model = "mlp", params = { hidden = [16] } }]\n'
        'penalties = ["none", "l2"]\nweights = [1e-4, 1e-2, 1.0]\nseeds = [0, 1]\nsplit_per_seed = true\n'
        '[stages]\nwide_seeds = [0]\nneighbours = 0\n[train]\nmax_epochs = 2\nprobe_batch = 32\n'
    )
    quiet = dict(workers=1, progress=False, log=lambda m: None)
    with pytest.raises(ConfigError, match="stage 2 needs every stage-1 run finished"):
        run_sweep(load_sweep(path, ["stages.run=2"]), tmp_path / "out", **quiet)
    run_sweep(load_sweep(path), tmp_path / "out", **quiet)
    with ResultStore(tmp_path / "out" / DB_NAME, create=False) as store:
        first = store.runs()
    assert len(first) == 4 and {r["seed"] for r in first} == {0}
    assert all(json.loads(r["config"])["split_seed"] == 0 for r in first)
    cfg2 = load_sweep(path, ["stages.run=2"])
    (w,) = stage_two_weights(cfg2, first)[("small", "l2")]
    run_sweep(cfg2, tmp_path / "out", **quiet)
    with ResultStore(tmp_path / "out" / DB_NAME, create=False) as store:
        runs = store.runs()
    second = [r for r in runs if r["seed"] == 1]
    assert sorted((r["penalty"], r["weight"]) for r in second) == [("l2", w), ("none", 0.0)]
    assert all(json.loads(r["config"])["split_seed"] == 1 and r["status"] == "done" for r in second)
    assert [r for r in runs if r["seed"] == 0] == first  # stage 1 untouched


def test_evidence_presets_bracket_and_converge():
    """The evidence sweeps: the paper's whole grid in two stages, its early stopping, a split per seed."""
    for name in ("evidence-digits", "evidence-mnist1d", "evidence-fashion-mnist", "evidence-fashion-cnn"):
        cfg = load_preset(name, check_names=True)
        cnn = name.endswith("cnn")
        assert cfg.split_per_seed and len(cfg.seeds) == (3 if cnn else 5)
        assert cfg.weights == ((1e-6, 1e-4, 1e-2, 1.0, 100.0) if cnn else PAPER_WEIGHTS)  # both ends of the paper's
        assert cfg.stages is not None and cfg.stages.run == 1 and cfg.stages.neighbours >= 1
        assert cfg.train.patience == 20 and cfg.train.max_epochs >= (100 if cnn else 400)
        assert {"decov", "decov_layer", "act_l2", "t1", "t2"} <= set(cfg.penalties)
        stage2 = load_preset(name, ["stages.run=2"])
        assert stage2.to_dict() == cfg.to_dict()  # both stages write one database
    cnn = load_preset("evidence-fashion-cnn")
    assert cnn.train_for("cnn2d-channel").mode == "channel" and cnn.train_for("cnn2d-channel").max_samples == 4096
    assert (cnn.train_for("cnn2d-importance").sampling, cnn.train_for("cnn2d-importance").fraction) == ("importance",
                                                                                                         0.005)


def test_per_network_training_overrides():
    cfg = parse_sweep({
        "dataset": "fashion-mnist", "penalties": ["none", "t1"], "weights": [1e-3],
        "networks": ["mlp", {"label": "cnn-channel", "model": "cnn2d", "train": {"mode": "channel"}},
                     {"label": "cnn-importance", "model": "cnn2d",
                      "train": {"sampling": "importance", "fraction": 0.01}}],
        "train": {"max_epochs": 3},
    })
    assert cfg.train_for("mlp") == cfg.train and cfg.train.mode == "flatten"
    assert cfg.train_for("cnn-channel") == TrainConfig(max_epochs=3, mode="channel")
    assert cfg.train_for("cnn-importance") == TrainConfig(max_epochs=3, sampling="importance", fraction=0.01)
    nets = cfg.to_dict()["networks"]
    assert "train" not in nets[0] and nets[1]["train"] == {"mode": "channel"}
    assert not {"mode", "max_samples"} & set(cfg.train.to_dict())  # defaults stay out of the stored protocol
    assert cfg.train_for("cnn-channel").to_dict()["mode"] == "channel"
    assert parse_sweep(json.loads(json.dumps(cfg.to_dict()))).to_dict() == cfg.to_dict()  # stored -> parsed
    from topodecorr.experiments.sweep import run_specs

    assert {s.network: s.train.mode for s in run_specs(cfg)} == {
        "mlp": "flatten", "cnn-channel": "channel", "cnn-importance": "flatten"}
    with pytest.raises(ConfigError, match=r"networks\[0\].train: unknown key\(s\) \['epochs'\]"):
        parse_sweep({"dataset": "digits", "networks": [{"model": "mlp", "train": {"epochs": 3}}]})
    assert TrainConfig(max_samples=4096).to_dict()["max_samples"] == 4096
    with pytest.raises(ConfigError, match=r"train.max_samples: must be 0 \(every row\) or >= 2"):
        TrainConfig(max_samples=1)
    with pytest.raises(ConfigError, match="train.mode: must be 'flatten' or 'channel'"):
        parse_sweep({"dataset": "digits", "networks": [{"model": "mlp", "train": {"mode": "pixel"}}]})


@pytest.mark.slow
def test_channel_mode_trains_a_cnn_with_a_tree_per_layer(tmp_path):
    """A CNN with every channel regularised: one tree per layer in training and in the death probe."""
    from topodecorr.experiments.store import ResultStore
    from topodecorr.experiments.sweep import DB_NAME, run_sweep

    cfg = parse_sweep({
        "dataset": "digits", "penalties": ["t1"], "weights": [1e-3], "seeds": [0],
        "networks": [{"label": "cnn", "model": "cnn2d", "params": {"dense": [12]},
                      "train": {"mode": "channel", "max_samples": 512}}],
        "train": {"max_epochs": 1, "probe_batch": 64},
    })
    run_sweep(cfg, tmp_path, workers=1, progress=False, log=lambda m: None)
    with ResultStore(tmp_path / DB_NAME, create=False) as store:
        (run,) = store.runs()
        deaths = store.deaths(run["id"])
    assert run["status"] == "done", run["error"]
    assert json.loads(run["config"])["train"]["mode"] == "channel"
    # 16 + 32 channels, 12 dense units, 10 logits: four trees, each one death short of its neurons
    assert deaths.shape == (16 + 32 + 12 + 10 - 4,)
    assert json.loads(run["metrics"])["neurons"] == 16 + 32 + 12 + 10
