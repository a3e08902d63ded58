"""The README's quick start must run as written (so it cannot drift from the API)."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs_and_reports_statistics(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python quick start"
    namespace: dict = {}
    exec(compile(blocks[0], "README quick start", "exec"), namespace)
    stats = namespace["reg"].last_stats
    # 64 hidden ReLU units + 5 logits, pooled; deaths lie in [0, 1]
    assert stats.neurons == 69
    assert 0.0 <= stats.min_death <= stats.mean_death <= stats.max_death <= 1.0
    assert not namespace["reg"].attached, "hooks must be removed when the with block ends"
    assert "StepStats(" in capsys.readouterr().out


def test_sweep_example_is_a_valid_sweep_file(tmp_path):
    """The README's example sweep file parses with the loader and names real datasets and networks."""
    from topodecorr.experiments.config import load_sweep

    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "README should show one example sweep file"
    path = tmp_path / "my-sweep.toml"
    path.write_text(blocks[0])
    cfg = load_sweep(path, check_names=True)
    assert cfg.name == "my-sweep" and cfg.dataset == "digits"
    assert [n.label for n in cfg.networks] == ["mlp", "mlp-deep", "narrow"]
    assert cfg.network("narrow").kwargs == {"hidden": (64, 32)}
    # none once per (network, seed), every other penalty once per weight
    assert len(cfg.grid()) == 3 * 3 * (1 + 3 * 2)
    assert (cfg.train.max_epochs, cfg.train.patience, cfg.train.lr) == (30, 6, 0.01)


def test_readme_commands_say_where_topodecorr_lives():
    text = README.read_text()
    assert "source .venv/bin/activate" in text and ".venv/bin/topodecorr" in text
    assert "make data" in text and "dataset-fashion-mnist" in text


# -- what the README states must be true ---------------------------------------------------------------

EXAMPLES = README.parent / "examples"


def test_every_example_is_listed_with_its_path():
    text = README.read_text()
    shipped = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert shipped, "no examples found"
    for name in shipped:
        assert f"`examples/{name}`" in text, f"README does not list examples/{name}"
    listed = sorted(set(re.findall(r"`examples/([\w-]+\.py)`", text)))
    assert listed == shipped  # and lists no example that does not exist


def test_stated_preset_and_penalty_figures_match_the_code():
    from topodecorr.experiments.config import PENALTIES, load_preset

    text = " ".join(README.read_text().split())
    listed = re.search(r"A sweep is the grid networks × penalties \(([^)]*)\)", text).group(1)
    assert tuple(re.findall(r"`(\w+)`", listed)) == PENALTIES
    quick = load_preset("quick")
    left_out = [p for p in PENALTIES if p not in quick.penalties]
    claim = (f"`quick` (digits, the paper's three MLP shapes, {len(quick.penalties)} penalties (all but "
             + ", ".join(f"`{p}`" for p in left_out[:-1]) + f" and `{left_out[-1]}`), {len(quick.weights)} weights, "
             f"{len(quick.seeds)} seeds: {len(quick.grid())} runs;")
    assert claim in text
    assert f"then {len(quick.grid())} short training runs (the `quick` preset" in text
    for name in ("paper-fashion-mnist", "paper-mnist"):
        cfg = load_preset(name)
        assert len(cfg.grid()) // len(cfg.seeds) == 183
    assert "protocol: 183 runs of up to 1200 epochs per seed" in text
    assert len(load_preset("paper-cifar10").networks) == 8 and "`paper-cifar10` (eight VGG-style CNNs" in text


def test_no_figure_about_the_test_suite_that_no_test_checks():
    text = " ".join(README.read_text().split())
    # test counts and suite durations change with every commit: the README states none
    assert not re.search(r"\d+ of \d+ tests|\d+ passed|\d+ deselected", text)
    assert not re.search(r"(suite|test run)[^.]*\d+(\.\d+)? ?(s|min|minutes|seconds)\b", text)


@pytest.mark.slow  # a ResNet-18 step
def test_cnn_section_runs_and_its_figures_hold():

    torchvision = pytest.importorskip("torchvision")
    import torch

    import topodecorr as td
    from readme_blocks import run_block

    namespace = run_block("CNNs and transformers")
    assert namespace["reg"].last_stats.clouds == (64,) * 5 + (128,) * 4 + (256,) * 4 + (512,) * 4
    # the default (flattened, pooled) call on the same network is refused with the figures the README gives
    model = torchvision.models.resnet18(num_classes=10)
    reg = td.Decorrelation(model, penalty="t1", weight=1e-3)
    with reg:
        model(torch.randn(4, 3, 32, 32))
        with pytest.raises(ValueError) as err:
            reg.penalty()
    msg = str(err.value)
    text = " ".join(README.read_text().split())
    assert "the pooled point cloud has 47114 neurons" in msg and "pools 47,114 of them" in text
    gb = re.search(r"would take ([0-9.]+) GB", msg).group(1)
    assert f"(an {gb} GB correlation matrix per step)" in text
    assert td.capture.MAX_NEURONS == 8192 and "`max_neurons` (8,192 by default" in text
    assert "mode='channel'" in msg and "pooled=False" in msg  # the remedies the README names


def test_inspect_pooled_is_none_per_channel_as_the_readme_says():
    import torch
    from torch import nn

    import topodecorr as td

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    report = td.inspect(model, [torch.randn(8, 3, 6, 6) for _ in range(2)], mode="channel")
    assert report.pooled is None and report.layers[0].pairs[0].correlation <= 1.0
    assert report["1"].pairs[0] == report.layers[0].pairs[0]
    text = " ".join(README.read_text().split())
    assert "with `mode=\"channel\"` or `\"features_last\"`" in text and "it is `None`" in text
