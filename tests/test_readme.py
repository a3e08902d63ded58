"""The README's quick start must run as written (so it cannot drift from the API)."""

from __future__ import annotations

import pathlib
import re

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
