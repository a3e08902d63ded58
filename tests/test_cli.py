"""The `topodecorr` command line: end to end, --help, clear errors that leave results intact."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from topodecorr.experiments.cli import build_parser, main

TINY_TOML = """
name = "cli-tiny"
dataset = "digits"
networks = ["mlp"]
penalties = ["none", "l2", "t1"]
weights = [1e-3]
seeds = [0, 1, 2]
[train]
max_epochs = 2
probe_batch = 64
"""


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("results.sqlite*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny sweep run through the CLI: data -> training -> database -> statistics -> report."""
    root = tmp_path_factory.mktemp("cli")
    config = root / "tiny.toml"
    config.write_text(TINY_TOML)
    out = root / "out"
    code = main(["sweep", str(config), "--out", str(out), "--workers", "1", "--quiet"])
    assert code == 0
    return config, out


@pytest.mark.slow
def test_end_to_end_sweep_writes_the_report(finished, capsys):
    _, out = finished
    report = (out / "report.md").read_text()
    assert "| network | none | l2 | t1 |" in report
    assert "| mlp |" in report and "**average rank**" in report
    # one network is one block (seeds are not blocks): the comparison is reported as not computed
    assert "at least 3 complete blocks (dataset, network), got 1" in report and "## Warnings" in report
    for fig in ("death_histograms.png", "correlations.png", "training_curves.png"):
        assert (out / "figures" / fig).stat().st_size > 1000, fig
        assert f"figures/{fig}" in report
    assert '"max_epochs": 2' in report and "| torch |" in report
    # `report` alone rebuilds it and prints the table
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| network | none | l2 | t1 |" in printed and "report.md" in printed


def test_help_lists_every_option_with_its_default(capsys):
    parser = build_parser()
    for cmd, options in {
        "reproduce": ["--preset", "--out", "--workers", "--data-dir", "--set", "--alpha"],
        "sweep": ["--out", "--workers", "--max-runs", "--stale-after"],
        "report": ["--alpha"],
        "train": ["--dataset", "--network", "--penalty", "--weight", "--seed", "--lr", "--momentum",
                  "--nesterov", "--lr-decay", "--decay-steps", "--batch-size", "--patience", "--max-epochs",
                  "--sampling", "--fraction", "--device", "--checkpoint"],
        "presets": [],
    }.items():
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])
        text = capsys.readouterr().out
        for opt in options:
            assert opt in text, (cmd, opt)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: 0.01)" in text and "(default: 3520)" in text and "(default: 1200)" in text


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["sweep", "--help"]])
def test_help_imports_no_torch(argv):
    """`topodecorr --help` answers without importing torch (seconds on a loaded machine)."""
    code = (
        "import sys\n"
        "from topodecorr.experiments.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "[]"
    assert "usage: topodecorr" in res.stdout


def test_help_lists_choices_and_each_default_once(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "dataset: digits | mnist1d | fashion-mnist | mnist | cifar10 (default: digits)" in text
    assert "network: mlp | mlp-dropout | mlp-deep | vgg | cnn1d" in text
    assert "t2 | t2_live (default: none)" in text
    assert text.count("(default: the dataset's usual places)") == 1 and "(default: None)" not in text
    assert "(default: [])" not in text and "(default: False)" not in text
    for cmd in ("sweep", "reproduce"):
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"] if cmd == "reproduce" else [cmd, "x", "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and text.count("(default: the dataset's usual places)") == 1


def test_train_errors_speak_of_train_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--network", "resnet"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --network: invalid choice: 'resnet'" in err and "networks" not in err
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "imagenet"])
    assert "argument --dataset: invalid choice: 'imagenet'" in capsys.readouterr().err
    for argv, message in [
        (["--param", "width=3"], "--param: unknown parameter(s) ['width'] for model 'mlp'; accepted: ["),
        (["--param", "depth"], "--param expects KEY=VALUE (e.g. depth=2), got 'depth'"),
        (["--max-epochs", "0"], "--max-epochs: must be >= 1, got 0"),
        (["--penalty", "t1"], "--weight: penalty 't1' needs a weight > 0"),
    ]:
        assert main(["train", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("topodecorr: error: " + message), err


def test_a_typo_in_set_is_blamed_on_set(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    out = tmp_path / "out"
    code = main(["sweep", str(config), "--out", str(out), "--quiet", "--set", "train.max_epoch=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("topodecorr: error: --set train.max_epoch=3: train: unknown key(s) ['max_epoch']"), err
    assert str(config) not in err and not out.exists()


@pytest.mark.slow
def test_presets_command_and_python_dash_m():
    res = subprocess.run([sys.executable, "-m", "topodecorr", "presets"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "quick" in res.stdout and "paper-fashion-mnist" in res.stdout and "paper-cifar10" in res.stdout


@pytest.mark.slow
def test_train_single_run(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["train", "--network", "mlp", "--penalty", "t2", "--weight", "0.01", "--max-epochs", "2",
                 "--probe-batch", "64", "--quiet", "--output", str(out)])
    assert code == 0
    assert '"status": "done"' in capsys.readouterr().out
    assert '"test_acc"' in out.read_text()


@pytest.mark.slow
def test_train_counts_epochs_from_one_like_its_progress_lines(tmp_path, capsys):
    import json

    out = tmp_path / "r.json"
    assert main(["train", "--param", "hidden=[16]", "--max-epochs", "3", "--probe-batch", "32", "--lr", "0.05",
                 "--output", str(out)]) == 0
    captured = capsys.readouterr()
    saved = json.loads(out.read_text())
    assert [h["epoch"] for h in saved["history"]] == [1, 2, 3]
    best = min(saved["history"], key=lambda h: h["val_loss"])
    assert saved["best_epoch"] == best["epoch"] == json.loads(captured.out)["best_epoch"]
    # the progress line of that epoch shows the same number and the same validation loss
    line = next(x for x in captured.err.splitlines() if f": epoch {best['epoch']}/3 " in x)
    assert f"val loss {best['val_loss']:.4f}" in line


@pytest.mark.slow
def test_train_without_a_terminal_prints_a_line_per_epoch(capsys):
    assert main(["train", "--network", "mlp", "--param", "hidden=[16]", "--max-epochs", "3", "--probe-batch", "32"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert [line.split(": epoch ")[1].split()[0] for line in lines] == ["1/3", "2/3", "3/3"], lines
    assert all(line.startswith("mlp none 0 s0: epoch ") for line in lines)
    assert '"status": "done"' in captured.out  # the result stays on stdout


@pytest.mark.parametrize(
    "toml, message",
    [
        ('dataset = "digits"\npenalties = ["t3"]\n', "unknown penalty 't3'"),
        ('dataset = "digits"\nweights = [-0.1]\n', "every weight must be > 0"),
        ('dataset = "imagenet"\n', "unknown dataset 'imagenet'"),
        ('dataset = "digits"\nnetworks = ["resnet"]\n', "unknown network 'resnet'"),
        ('dataset = "digits"\n[train]\nmax_epoch = 3\n', "unknown key(s) ['max_epoch']"),
        ("dataset = \n", "not valid TOML"),
    ],
)
@pytest.mark.slow
def test_bad_configuration_is_refused_and_results_stay(finished, tmp_path, capsys, toml, message):
    _, out = finished
    before = _digest(out)
    bad = tmp_path / "bad.toml"
    bad.write_text(toml)
    assert main(["sweep", str(bad), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("topodecorr: error: ") and message in err
    assert _digest(out) == before


@pytest.mark.slow
def test_changed_protocol_into_an_existing_sweep_is_refused(finished, tmp_path, capsys):
    config, out = finished
    before = _digest(out)
    code = main(["sweep", str(config), "--out", str(out), "--quiet", "--set", "train.max_epochs=3"])
    assert code == 2 and "different protocol" in capsys.readouterr().err
    assert _digest(out) == before


def test_unreadable_data_file_gives_a_clear_error(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (data / f"{stem}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03garbage"))
    cfg = tmp_path / "f.toml"
    cfg.write_text('dataset = "fashion-mnist"\nnetworks = ["mlp"]\npenalties = ["none"]\n')
    code = main(["sweep", str(cfg), "--out", str(tmp_path / "out"), "--data-dir", str(data), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "idx" in err.lower() and str(data) in err
    assert not (tmp_path / "out" / "results.sqlite").exists()


def test_corrupt_database_is_refused_and_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.sqlite").write_bytes(b"garbage, not SQLite" * 100)
    before = _digest(out)
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    assert main(["sweep", str(config), "--out", str(out), "--quiet"]) == 2
    assert "not a readable topodecorr results database" in capsys.readouterr().err
    assert main(["report", str(out)]) == 2
    assert "left untouched" in capsys.readouterr().err
    assert _digest(out) == before
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no results database" in capsys.readouterr().err


# -- failures are said, and named ---------------------------------------------------------------------

ONE_SEED_TOML = TINY_TOML.replace("seeds = [0, 1, 2]", "seeds = [0]").replace("max_epochs = 2", "max_epochs = 1")


@pytest.mark.slow
def test_a_sweep_with_failed_runs_exits_1_and_names_them(tmp_path, capsys, monkeypatch):
    import topodecorr.experiments.sweep as sweep_module

    real = sweep_module.train_run

    def flaky(spec, *args, **kwargs):
        if spec.penalty == "t1":
            raise RuntimeError("boom in the penalty")
        if spec.penalty == "l2":  # a diverged run is a result, not a failure
            return {"status": "diverged", "error": "non-finite loss at epoch 0", "history": [], "epochs": 1,
                    "versions": {}}
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "train_run", flaky)
    config = tmp_path / "one.toml"
    config.write_text(ONE_SEED_TOML)
    out = tmp_path / "out"
    assert main(["sweep", str(config), "--out", str(out), "--workers", "1", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.err.endswith(
        "topodecorr: error: 1 of 3 runs failed (an error, unlike a diverged run, which is a result):\n"
        "  mlp t1 0.001 s0: RuntimeError: boom in the penalty\n"
        f"Their tracebacks are in {out / 'results.sqlite'} (table runs, column error); run the same command "
        "again to retry them.\n"), captured.err
    assert "runs: 1 done, 1 diverged, 1 failed" in captured.out and (out / "report.md").exists()

    # only diverged runs (the failed one retried and done now): a result, status 0
    monkeypatch.setattr(sweep_module, "train_run",
                        lambda spec, *a, **k: flaky(spec, *a, **k) if spec.penalty != "t1" else real(spec, *a, **k))
    assert main(["sweep", str(config), "--out", str(out), "--workers", "1", "--quiet", "--no-report"]) == 0
    assert "runs: 2 done, 1 diverged" in capsys.readouterr().out


@pytest.mark.slow
def test_keep_checkpoints_on_a_finished_sweep_says_nothing_was_rerun(finished, capsys):
    config, out = finished
    assert main(["sweep", str(config), "--out", str(out), "--quiet", "--keep-checkpoints", "--no-report"]) == 0
    err = capsys.readouterr().err
    assert ("topodecorr: note: --keep-checkpoints kept nothing: no run was re-run (every run of this sweep had "
            "finished before); checkpoints are kept only for runs that train in this invocation (use a new --out "
            "to train them again)\n") in err
    assert not list((out / "checkpoints").glob("*.pt"))


@pytest.mark.parametrize("argv,message", [
    (["--workers", "-3"], "--workers: the number of worker processes must be 0 (one per CPU core) or more, got -3"),
    (["--max-runs", "-1"], "--max-runs: the number of runs to start must be 1 or more, got -1 (leave the option out "
                           "to run every run)"),
    (["--max-runs", "0"], "--max-runs: the number of runs to start must be 1 or more, got 0"),
    (["--stale-after", "0"], "--stale-after: seconds without heartbeat must be positive, got 0"),
    (["--alpha", "1.5"], "--alpha: the significance level must lie in (0, 1), got 1.5"),
])
def test_nonsense_sweep_options_are_refused_before_anything_is_written(tmp_path, capsys, argv, message):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    out = tmp_path / "out"
    assert main(["sweep", str(config), "--out", str(out), "--quiet", *argv]) == 2
    assert capsys.readouterr().err.startswith(f"topodecorr: error: {message}")
    assert not out.exists()


def test_out_pointing_at_a_file_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    target = tmp_path / "a-file"
    target.write_text("keep me")
    assert main(["sweep", str(config), "--out", str(target), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"topodecorr: error: the output folder {target} is a file, not a folder; "
                                       "choose another output folder\n")
    assert target.read_text() == "keep me"


def test_train_with_a_parameter_the_model_refuses_is_an_option_error(capsys):
    assert main(["train", "--param", "hidden=oops", "--quiet"]) == 2
    assert capsys.readouterr().err == ("topodecorr: error: --param: network 'mlp': hidden must be a sequence of "
                                       "layer widths, got 'oops'\n")


def test_a_network_that_cannot_be_built_is_refused_before_the_database_exists(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(TINY_TOML.replace('networks = ["mlp"]',
                                        'networks = [{ label = "odd", model = "mlp", params = { hidden = "..." } }]'))
    out = tmp_path / "out"
    assert main(["sweep", str(config), "--out", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        "topodecorr: error: network 'odd' (model 'mlp') cannot be built: network 'mlp': hidden must be a sequence "
        "of layer widths, got '...'; fix the sweep file (nothing was written)\n")
    assert not (out / "results.sqlite").exists() and not (out / "checkpoints").exists()


def test_empty_database_file_is_refused_by_sweep_and_report(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.sqlite").write_bytes(b"")
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    for argv in (["sweep", str(config), "--out", str(out), "--quiet"], ["report", str(out)]):
        assert main(argv) == 2
        assert capsys.readouterr().err.startswith(
            f"topodecorr: error: {out / 'results.sqlite'} is empty (0 bytes): it holds no results")
    assert (out / "results.sqlite").read_bytes() == b""


def test_read_only_places_are_named(tmp_path, capsys, monkeypatch):
    """A read-only output folder, database file or checkpoints folder: what is not writable, and where
    (simulated: root, which runs CI in containers, ignores permission bits)."""
    import topodecorr.experiments.store as store_module
    import topodecorr.experiments.sweep as sweep_module

    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    out = tmp_path / "out"
    from topodecorr.experiments.store import ResultStore

    ResultStore(out / "results.sqlite").close()  # a healthy (empty) database
    real = os.access

    def deny(*paths):
        blocked = {str(p) for p in paths}
        fake = lambda p, mode, **kw: False if str(p) in blocked and mode & os.W_OK else real(p, mode, **kw)  # noqa: E731
        monkeypatch.setattr(store_module.os, "access", fake)
        monkeypatch.setattr(sweep_module.os, "access", fake)

    cases = [
        ((out,), f"the output folder {out} is read-only for this user; make it writable (chmod u+w {out}) or "
                 "choose another output folder"),
        ((out / "checkpoints",), f"the checkpoint folder {out / 'checkpoints'} is read-only for this user; make it "
                                 f"writable (chmod u+w {out / 'checkpoints'}) or choose another with --checkpoint-dir"),
        ((out / "results.sqlite",), f"{out / 'results.sqlite'} is read-only for this user: a sweep, a resume and a "
                                    "report all write to it."),
    ]
    for paths, message in cases:
        deny(*paths)
        assert main(["sweep", str(config), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"topodecorr: error: {message}"), err
        assert "not a readable" not in err and "move it away" not in err
    deny(out)
    assert main(["report", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"topodecorr: error: the folder {out} is read-only for this user")
