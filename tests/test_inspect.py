"""topodecorr.inspect: the redundancy map of a trained model, against numpy / scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.csgraph import minimum_spanning_tree
from torch import nn

import topodecorr as td


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(n=4, b=50, d=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g) for _ in range(n)]


def _reference_acts(model, batches):
    """Every hidden activation module's output and the logits, by hand (no hooks)."""
    with torch.no_grad():
        x = torch.cat(batches)
        h1 = model[1](model[0](x))
        h2 = model[3](model[2](h1))
        out = model[4](h2)
    return {"1": h1.double().numpy(), "3": h2.double().numpy(), "output": out.double().numpy()}


def _ref_corr(a):
    """np.corrcoef with the library's convention for constant columns (correlation 0, 1 on the diagonal)."""
    std = a.std(axis=0)
    dead = std <= 1e-12 * np.maximum(1.0, np.abs(a).max(axis=0))
    safe = np.where(dead[None, :], np.arange(a.shape[0])[:, None] * 1.0, a)  # any non-constant stand-in
    c = np.corrcoef(safe, rowvar=False)
    c[dead, :] = 0.0
    c[:, dead] = 0.0
    np.fill_diagonal(c, 1.0)
    return c, dead


def _ref_mst_deaths(c):
    D = 1.0 - np.abs(c)
    np.fill_diagonal(D, 0.0)
    # scipy drops zero-weight edges: shift every off-diagonal weight by 1 and subtract it again
    W = np.where(np.eye(len(D), dtype=bool), 0.0, D + 1.0)
    tree = minimum_spanning_tree(W).toarray()
    return np.sort(tree[tree > 0] - 1.0)


def test_deaths_and_correlations_match_numpy_and_scipy():
    model, batches = _mlp(), _batches()
    report = td.inspect(model, batches, k=5)
    ref = _reference_acts(model, batches)
    assert [c.name for c in report.layers] == ["1", "3", "output"]
    assert report.samples == 200 and report.batches == 4
    for name, a in ref.items():
        c, _ = _ref_corr(a)
        np.testing.assert_allclose(report[name].deaths.numpy(), _ref_mst_deaths(c), atol=1e-9)
        for p in report[name].pairs:
            assert p.a[0] == p.b[0] == name
            assert p.correlation == pytest.approx(c[p.a[1], p.b[1]], abs=1e-9)
            assert p.death == pytest.approx(1 - abs(c[p.a[1], p.b[1]]), abs=1e-9)
    pooled = np.concatenate(list(ref.values()), axis=1)
    c, _ = _ref_corr(pooled)
    assert report.pooled.neurons == 16 + 8 + 3
    np.testing.assert_allclose(report.pooled.deaths.numpy(), _ref_mst_deaths(c), atol=1e-9)
    # the first pair is the most correlated pair of the whole cloud
    off = np.abs(c) - np.eye(len(c)) * 2
    assert report.pooled.pairs[0].death == pytest.approx(1 - off.max(), abs=1e-9)
    # the tree spans the cloud: n - 1 edges, every index named by its label
    assert report.pooled.edges.shape == (26, 2)
    assert len({int(i) for i in report.pooled.edges.flatten()}) == 27
    assert report.pooled.labels[16] == ("3", 0)


def test_result_does_not_depend_on_batching():
    model = _mlp()
    batches = _batches(n=4, b=50)
    whole = td.inspect(model, [torch.cat(batches)])
    split = td.inspect(model, batches)
    torch.testing.assert_close(whole.pooled.deaths, split.pooled.deaths, atol=1e-10, rtol=0)


def test_planted_duplicate_neurons_rank_first_with_correlation_one():
    model = _mlp(seed=3)
    with torch.no_grad():  # neuron 7 of the first hidden layer becomes a copy of neuron 3
        model[0].weight[7] = model[0].weight[3]
        model[0].bias[7] = model[0].bias[3] + 0.5  # both strictly positive on most inputs
        model[0].bias[3] += 0.5
    report = td.inspect(model, _batches())
    for cloud in (report["1"], report.pooled):
        top = cloud.pairs[0]
        assert {top.a, top.b} == {("1", 3), ("1", 7)}
        assert top.correlation == pytest.approx(1.0, abs=1e-9)
        assert top.death == pytest.approx(0.0, abs=1e-9)
        assert cloud.pairs[1].death > 1e-3  # nothing else is a duplicate
    assert "1[3] ~ 1[7]" in report.to_markdown()


def test_dead_neurons_are_counted_and_get_deaths_of_one():
    model = _mlp(seed=4)
    with torch.no_grad():  # ReLU units 0, 5, 9 never fire
        for i in (0, 5, 9):
            model[0].weight[i] = 0.0
            model[0].bias[i] = -1.0
    report = td.inspect(model, _batches())
    layer = report["1"]
    assert layer.dead == 3 and layer.dead_neurons == (("1", 0), ("1", 5), ("1", 9))
    assert report["3"].dead == 0 and report.pooled.dead == 3
    # a dead neuron has correlation 0 with every other one: its tree edge has death 1
    dead_edges = [r for r, (i, j) in enumerate(layer.edges.tolist()) if {i, j} & {0, 5, 9}]
    assert len(dead_edges) >= 3
    assert all(layer.deaths[r] == 1.0 for r in dead_edges)
    assert "Dead neurons (3)" in report.to_markdown()


def test_channel_mode_matches_a_hand_built_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3), nn.ReLU(), nn.Flatten())
    xs = [torch.randn(6, 2, 7, 7) for _ in range(2)]
    report = td.inspect(model, xs, mode="channel", layers=["1", "3"])
    assert [c.name for c in report.layers] == ["1", "3"]
    assert report.pooled is None  # 7x7 and 5x5 maps: the layers share no samples
    with torch.no_grad():
        h = model[1](model[0](torch.cat(xs)))
    a = h.movedim(1, -1).reshape(-1, 5).double().numpy()
    c, _ = _ref_corr(a)
    np.testing.assert_allclose(report["1"].deaths.numpy(), _ref_mst_deaths(c), atol=1e-9)
    assert report["1"].neurons == 5 and report.samples == 12 * 49


def test_model_mode_and_gradients_are_left_alone():
    model = _mlp().train()
    td.inspect(model, _batches(n=1))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert not model._forward_hooks and not model[1]._forward_hooks


def test_batches_as_tuples_and_dicts():
    model = _mlp()
    xs = _batches(n=2)
    a = td.inspect(model, [(x, torch.zeros(len(x))) for x in xs])
    b = td.inspect(model, xs)
    torch.testing.assert_close(a.pooled.deaths, b.pooled.deaths)

    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, inputs):
            return self.net(inputs)

    c = td.inspect(Kw(), [{"inputs": x} for x in xs])
    torch.testing.assert_close(c.pooled.deaths, b.pooled.deaths)
    assert [l.name for l in c.layers] == ["net.1", "net.3", "output"]


def test_bad_input_gives_clear_errors():
    model = _mlp()
    with pytest.raises(ValueError, match="batches is empty"):
        td.inspect(model, [])
    with pytest.raises(ValueError, match="matches no module"):
        td.inspect(model, _batches(n=1), layers=["encoder.*"])
    with pytest.raises(TypeError, match="nn.Module"):
        td.inspect({"weight": torch.zeros(2)}, _batches(n=1))
    with pytest.raises(TypeError, match="iterable of batches"):
        td.inspect(model, torch.randn(10, 6))
    with pytest.raises(ValueError, match="at least 2 samples"):
        td.inspect(model, [torch.randn(1, 6)])
    with pytest.raises(ValueError, match="max_neurons"):
        td.inspect(model, _batches(n=1), max_neurons=10)
    with pytest.raises(td.NonFiniteActivationsError):
        td.inspect(model, [torch.full((4, 6), float("nan"))])
    with pytest.raises(ValueError, match="unknown mode"):
        td.inspect(model, _batches(n=1), mode="pixels")


@pytest.mark.slow
def test_save_writes_markdown_and_figures(tmp_path):
    report = td.inspect(_mlp(), _batches(n=2), k=3)
    path = report.save(tmp_path / "out")
    text = path.read_text()
    assert path.name == "inspect.md" and "| pooled | 27 |" in text
    assert "![MST deaths per layer](deaths.png)" in text
    for png in ("deaths.png", "pairs.png"):
        data = (tmp_path / "out" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    # the scatter uses the kept activations of the first samples
    p = report.pooled.pairs[0]
    assert report.activations(p.a).shape == (100,)


@pytest.mark.slow
def test_gpt2_blocks_are_read_per_token(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(0, 64, (3, 16), generator=g)} for _ in range(2)]
    report = td.inspect(model, batches)
    assert [c.name for c in report.layers] == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
    assert report.samples == 2 * 3 * 16 and report["transformer.h.0.mlp.act"].neurons == 128
    acts = []
    hooks = [model.transformer.h[i].mlp.act.register_forward_hook(lambda m, i, o: acts.append(o)) for i in (0, 1)]
    model.eval()  # no dropout, as inspect runs it
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    per_layer = [torch.cat([acts[2 * k + l] for k in range(2)]).reshape(-1, 128) for l in (0, 1)]
    for layer, a in zip(report.layers, per_layer):
        c, _ = _ref_corr(a.double().numpy())
        np.testing.assert_allclose(layer.deaths.numpy(), _ref_mst_deaths(c), atol=1e-9)
    assert report.pooled.neurons == 256


# -- the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harness_checkpoint(tmp_path_factory):
    from topodecorr.experiments.config import TrainConfig
    from topodecorr.experiments.train import RunSpec, train_run

    path = tmp_path_factory.mktemp("ckpt") / "run.pt"
    spec = RunSpec(dataset="digits", network="mlp", model="mlp", penalty="t1", weight=1e-3, seed=0,
                   train=TrainConfig(max_epochs=2, batch_size=128))
    result = train_run(spec, path)
    assert result["status"] == "done" and path.is_file()
    return path


@pytest.mark.slow
def test_cli_inspects_a_harness_checkpoint(harness_checkpoint, tmp_path, capsys):
    from topodecorr.experiments.cli import main
    from topodecorr.experiments.data import load_dataset
    from topodecorr.experiments.inspect_cli import load_model
    from topodecorr.experiments.models import build_model

    out = tmp_path / "insp"
    assert main(["inspect", str(harness_checkpoint), "--out", str(out), "--samples", "200", "--batch-size", "64",
                 "--quiet"]) == 0
    text = (out / "inspect.md").read_text()
    assert "200 samples from 4 batch(es)" in text
    assert (out / "deaths.png").is_file() and (out / "pairs.png").is_file()
    assert "report:" in capsys.readouterr().out
    # the same numbers as the API on the checkpoint's best weights and the validation split
    spec, state = load_model(harness_checkpoint)
    data = load_dataset("digits")
    model = build_model(spec.model, data.input_shape, data.num_classes, **dict(spec.model_params))
    model.load_state_dict(state)
    x = data.val[0][:200]
    report = td.inspect(model, [x[i : i + 64] for i in range(0, 200, 64)])
    s = report.pooled.summary()
    assert f"| pooled | {s['neurons']} | {s['dead']} | {s['min_death']:.4f} |" in text


@pytest.mark.slow
def test_cli_without_a_terminal_draws_no_bar_into_the_output(harness_checkpoint, tmp_path, capsys):
    from topodecorr.experiments.cli import main

    # no --quiet, but stderr is captured (a pipe, a log file): no bar, so no carriage return
    assert main(["inspect", str(harness_checkpoint), "--out", str(tmp_path / "o"), "--samples", "100"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "\r" not in captured.out
    assert captured.out.splitlines()[-1] == f"report: {tmp_path / 'o' / 'inspect.md'}"


@pytest.mark.slow
def test_cli_loads_pickled_modules_only_when_asked(tmp_path, capsys):
    from topodecorr.experiments.cli import main

    module = tmp_path / "module.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)), module)
    assert main(["inspect", str(module), "--dataset", "digits", "--quiet", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    # one whole sentence, no terminal colour codes, the refused class named
    assert err == (f"topodecorr: error: {module} is not loadable with weights_only=True: it holds pickled objects "
                   "(e.g. a whole nn.Module saved with torch.save(model), here "
                   "torch.nn.modules.container.Sequential), and loading them runs code from the file. "
                   "Pass --unsafe-load if you trust the file.\n")
    with pytest.warns(UserWarning, match="runs code"):
        assert main(["inspect", str(module), "--dataset", "digits", "--unsafe-load", "--quiet",
                     "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "inspect.md").is_file()
    # without --dataset a module names no data
    with pytest.warns(UserWarning, match="runs code"):
        assert main(["inspect", str(module), "--unsafe-load", "--quiet"]) == 2
    assert "--dataset" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content,message",
    [
        (lambda p: torch.save(nn.Linear(2, 2).state_dict(), p), "state_dict"),
        (lambda p: torch.save([1, 2], p), "not a model"),
        (lambda p: p.write_bytes(b"not a checkpoint"), "not a file torch.load can read"),
        (None, "does not exist"),
    ],
)
def test_cli_refuses_files_that_are_not_models(tmp_path, capsys, content, message):
    from topodecorr.experiments.cli import main

    path = tmp_path / "thing.pt"
    if content is not None:
        content(path)
    assert main(["inspect", str(path), "--dataset", "digits", "--quiet", "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_layer_pattern_matching_nothing_is_a_clear_error(harness_checkpoint, tmp_path, capsys):
    from topodecorr.experiments.cli import main

    assert main(["inspect", str(harness_checkpoint), "--layers", "encoder.*", "--quiet",
                 "--out", str(tmp_path / "o")]) == 2
    assert "matches no module" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_inspect_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    from readme_blocks import run_block

    monkeypatch.chdir(tmp_path)
    ns = run_block("Which neurons are redundant?")
    report = ns["report"]
    assert report.samples == 2048 and report.pooled.neurons == 69
    assert str(report.pooled.pairs[0]) in capsys.readouterr().out
    assert (tmp_path / "inspect" / "inspect.md").is_file() and (tmp_path / "inspect" / "pairs.png").is_file()


@pytest.mark.slow  # a figure
def test_near_dead_pairs_at_plus_one_are_explained_and_deaths_figure_is_labelled():
    model = _mlp(seed=5)
    batches = _batches()
    x = torch.cat(batches)
    with torch.no_grad():  # units 2 and 4 fire on the one sample where input 0 is largest, and nowhere else
        top = x[:, 0].max()
        second = x[:, 0].topk(2).values[1]
        for i, scale in ((2, 1.0), (4, 3.0)):
            model[0].weight[i] = 0.0
            model[0].weight[i, 0] = scale
            model[0].bias[i] = -scale * float((top + second) / 2)
    report = td.inspect(model, batches)
    pair = report["1"].pairs[0]
    assert {pair.a, pair.b} == {("1", 2), ("1", 4)} and pair.correlation == pytest.approx(1.0, abs=1e-9)
    text = report.to_markdown()
    assert "| 1 | 1[2] | 1[4] | +1.0000 |" in text or "| 1 | 1[4] | 1[2] | +1.0000 |" in text
    assert ("A correlation of +1.0000 is not always a duplicated feature: two near-dead neurons that are zero on "
            "every sample but one (the same one) also correlate at exactly +1.") in text
    # without such a pair, no note
    assert "not always a duplicated feature" not in td.inspect(_mlp(), _batches(n=2)).to_markdown()
    fig = report.plot_deaths()
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_title()] == ["tree edges (of n - 1)"] * len(report.clouds)
    import matplotlib.pyplot as plt

    plt.close(fig)
