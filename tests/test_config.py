"""Sweep configuration: defaults are the paper's, TOML parsing, validation, presets."""

from __future__ import annotations

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
