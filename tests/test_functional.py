"""decorrelation_penalty: the one pipeline (sample -> correlation deaths -> penalty) without hooks."""

from __future__ import annotations

import pytest
import torch

import topodecorr as td
from topodecorr.functional import flatten_activation


def _reference(acts, penalty, kind="abs", alpha=0.5):
    x = torch.cat(acts, 1)
    D = td.dissimilarity(td.correlation(x), kind)
    d = td.mst_deaths(D, backend="numpy").deaths
    return td.t1(d) if penalty == "t1" else td.t2(d, alpha=alpha)


@pytest.mark.parametrize("penalty", ["t1", "t2"])
@pytest.mark.parametrize("kind", ["abs", "sqrt"])
def test_matches_explicit_pipeline_value_and_gradient(penalty, kind):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 12, generator=g, dtype=torch.float64).relu().requires_grad_()
    b = torch.randn(30, 4, generator=g, dtype=torch.float64).requires_grad_()
    p = td.decorrelation_penalty([a, b], penalty, weight=2.0, dissimilarity=kind, alpha=0.3)
    ga, gb = torch.autograd.grad(p, [a, b])
    q = 2.0 * _reference([a, b], penalty, kind, alpha=0.3)
    ha, hb = torch.autograd.grad(q, [a, b])
    torch.testing.assert_close(p, q)
    torch.testing.assert_close(ga, ha)
    torch.testing.assert_close(gb, hb)


def test_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 6, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: td.decorrelation_penalty([x], "t1"), (a,), eps=1e-7, atol=1e-5)


def test_importance_sampling_uses_same_neurons_for_every_penalty():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(40, 100, generator=g) * torch.linspace(0.1, 2, 100)
    out = torch.randn(40, 5, generator=g)
    top = h.abs().mean(0).topk(10).indices.sort().values
    ref_x = torch.cat([h[:, top], out], 1)
    for pen, ref in (
        ("t1", _reference([ref_x], "t1")),
        ("mean_abs_corr", td.mean_abs_correlation(td.correlation(ref_x))),
        ("decov", td.decov(ref_x)),
    ):
        res = td.decorrelation_result([h, out], pen, sampling="importance", fraction=0.1)
        torch.testing.assert_close(res.value, ref)
        assert res.neurons == 15


def test_per_layer_sums_and_none_is_zero_with_graph():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(20, 7, generator=g), torch.randn(20, 3, generator=g)
    p = td.decorrelation_penalty([a, b], "t2", pooled=False)
    torch.testing.assert_close(p, _reference([a], "t2") + _reference([b], "t2"))
    z = td.decorrelation_penalty([a.requires_grad_(), b], "none")
    assert float(z.detach()) == 0.0 and z.requires_grad


def test_edges_reuse_recomputes_deaths_on_old_tree():
    g = torch.Generator().manual_seed(4)
    a, a2 = torch.randn(20, 9, generator=g), torch.randn(20, 9, generator=g)
    r = td.decorrelation_result([a], "t1")
    r2 = td.decorrelation_result([a2], "t1", indices=r.indices, edges=r.edges)
    D2 = td.dissimilarity(td.correlation(a2))
    e = r.edges[0]
    torch.testing.assert_close(r2.deaths[0].sort().values, D2[e[:, 0], e[:, 1]].sort().values)
    # a stale tree weighs at least the exact MST: T1 on it is at most the exact T1
    assert float(r2.value) <= float(_reference([a2], "t1")) + 1e-6


def test_flatten_modes_and_errors():
    x = torch.arange(2 * 3 * 2 * 2.0).reshape(2, 3, 2, 2)
    assert flatten_activation(x).shape == (2, 12)
    c = flatten_activation(x, "channel")
    assert c.shape == (8, 3) and torch.equal(c[:, 1], x[:, 1].reshape(-1))
    with pytest.raises(ValueError, match="batch dimension"):
        flatten_activation(torch.ones(3))
    with pytest.raises(ValueError, match="same samples"):
        td.decorrelation_penalty([torch.ones(3, 2), torch.ones(4, 2)])
    with pytest.raises(ValueError, match="no activations"):
        td.decorrelation_penalty([])
    with pytest.raises(ValueError, match="unknown penalty"):
        td.decorrelation_penalty([torch.randn(4, 3)], "t9")


def _with_dead_columns(seed=0, batch=64, live=7, dead=3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, live, generator=g, dtype=torch.float64)
    # constant columns: a ReLU that never fires (0) and one stuck at a positive value
    consts = torch.zeros(batch, dead, dtype=torch.float64)
    consts[:, 0] = 2.5
    return torch.cat([a[:, :3], consts, a[:, 3:]], dim=1), a


def test_dead_neurons_keep_is_the_papers_convention():
    acts, _ = _with_dead_columns()
    r = td.decorrelation_result([acts], "t1", dead_neurons="keep")
    deaths = torch.cat(r.deaths)
    assert r.neurons == 10 and deaths.numel() == 9
    # every dead neuron is uncorrelated with everything: it joins the tree with a death of exactly 1
    assert int((deaths == 1.0).sum()) >= 3
    assert int(r.dead) == 3


def test_dead_neurons_drop_equals_the_live_cloud():
    acts, live = _with_dead_columns()
    acts.requires_grad_(True)
    r = td.decorrelation_result([acts], "t1", dead_neurons="drop")
    ref = td.correlation_deaths(live).deaths
    torch.testing.assert_close(torch.cat(r.deaths), ref)
    assert r.neurons == 7 and int(r.dead) == 3  # the dead are counted, not in the cloud
    r.value.backward()
    assert torch.isfinite(acts.grad).all()
    assert bool((acts.grad[:, 3:6] == 0).all())  # dropped columns get no gradient
    assert float(acts.grad[:, :3].abs().sum()) > 0


def test_dead_neurons_drop_all_dead_or_one_live_gives_zero_not_nan():
    acts = torch.zeros(32, 4, requires_grad=True)
    for penalty in ("t1", "t2", "mean_abs_corr", "decov"):
        v = td.decorrelation_penalty([acts], penalty, dead_neurons="drop")
        assert float(v) == 0.0
    one = torch.cat([torch.randn(32, 1), torch.zeros(32, 3)], dim=1)
    r = td.decorrelation_result([one], "t2", dead_neurons="drop")
    assert float(r.value) == 0.0 and r.neurons == 1 and int(r.dead) == 3


def test_dead_neurons_bad_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="dead_neurons"):
        td.decorrelation_penalty([torch.randn(8, 3)], "t1", dead_neurons="penalise")


def test_t1_is_the_same_under_both_dead_neuron_policies_but_t2_is_not():
    # dead neurons join the MST last, with deaths of exactly 1, so they add 1 - 1 = 0 to T1:
    # T1's value and gradient do not depend on the policy; T2's mean and std do
    acts, _ = _with_dead_columns(seed=3)
    grads = {}
    for policy in ("keep", "drop"):
        for penalty in ("t1", "t2"):
            a = acts.clone().requires_grad_(True)
            v = td.decorrelation_penalty([a], penalty, dead_neurons=policy)
            v.backward()
            grads[policy, penalty] = (v.detach(), a.grad)
    torch.testing.assert_close(grads["keep", "t1"][0], grads["drop", "t1"][0])
    torch.testing.assert_close(grads["keep", "t1"][1], grads["drop", "t1"][1])
    assert abs(float(grads["keep", "t2"][0] - grads["drop", "t2"][0])) > 1e-3


# --------------------------------------------------------------------------- per-layer clouds, modes


@pytest.mark.slow
@pytest.mark.parametrize("penalty", ["t1", "t2"])
def test_per_layer_clouds_have_their_own_samples_value_and_gradient(penalty):
    from references import reference_penalty

    # a ResNet-like set: B*H*W rows shrink with the resolution, the logits have B rows
    g = torch.Generator().manual_seed(11)
    acts = [
        torch.randn(256, 6, generator=g, dtype=torch.float64).relu().requires_grad_(),
        torch.randn(64, 9, generator=g, dtype=torch.float64).requires_grad_(),
        torch.randn(16, 4, generator=g, dtype=torch.float64).requires_grad_(),
    ]
    r = td.decorrelation_result(acts, penalty, weight=0.5, pooled=False, alpha=0.3)
    assert r.clouds == (6, 9, 4) and r.neurons == 19
    assert [d.numel() for d in r.deaths] == [5, 8, 3]
    q = 0.5 * reference_penalty(acts, penalty, alpha=0.3)
    torch.testing.assert_close(r.value, q)
    for ga, ha in zip(torch.autograd.grad(r.value, acts), torch.autograd.grad(q, acts)):
        torch.testing.assert_close(ga, ha)


def test_pooling_layers_with_different_sample_counts_says_why_and_suggests_per_layer():
    acts = [torch.randn(64, 3), torch.randn(64, 2), torch.randn(16, 4)]
    with pytest.raises(ValueError, match=r"activation 2 has 16 samples.*activation 0 has 64.*pooled=False"):
        td.decorrelation_penalty(acts, "t1")
    # the same layers as separate clouds are fine
    assert torch.isfinite(td.decorrelation_penalty(acts, "t1", pooled=False))


def test_features_last_rows_are_batch_times_tokens_and_neurons_the_last_dim():
    from references import reference_penalty

    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)  # (batch, tokens, features)
    f = flatten_activation(x, "features_last")
    assert f.shape == (15, 7)
    for b in range(3):
        for t in range(5):
            assert torch.equal(f[b * 5 + t], x[b, t])
    # 4-D (channels-last map): every position a sample
    assert flatten_activation(torch.zeros(2, 4, 3, 6), "features_last").shape == (24, 6)
    # (batch, features) is the same in every mode
    y = torch.randn(4, 3)
    for mode in ("flatten", "channel", "features_last"):
        assert torch.equal(flatten_activation(y, mode), y)
    # the pipeline on it equals the per-feature reference, value and gradient
    p = td.decorrelation_penalty([f], "t1")
    q = reference_penalty([x.reshape(15, 7)], "t1")
    torch.testing.assert_close(p.double(), q)
    torch.testing.assert_close(torch.autograd.grad(p, x)[0], torch.autograd.grad(q, x)[0])


def test_channel_mode_rows_are_batch_times_positions():
    x = torch.randn(2, 3, 4, 5)
    c = flatten_activation(x, "channel")
    assert c.shape == (40, 3)
    assert torch.equal(c[1 * 20 + 2 * 5 + 3], x[1, :, 2, 3])


@pytest.mark.parametrize(
    "x, mode, msg",
    [
        (torch.ones(3), "features_last", r"mode='features_last' needs .*\(batch, \.\.\., features\).*\(3,\)"),
        (torch.ones(3), "channel", r"\(batch, channels, \*spatial\)"),
        (torch.ones(()), "flatten", "batch dimension"),
        (torch.ones(4, 0, 8), "features_last", "no entries"),
        (torch.ones(4, 3), "tokens", "unknown mode"),
    ],
)
def test_modes_that_do_not_fit_the_shape_are_clear_errors(x, mode, msg):
    with pytest.raises(ValueError, match=msg):
        flatten_activation(x, mode)


# --------------------------------------------------------------------------- row subsampling


def test_max_samples_draws_rows_without_replacement_and_equals_the_reference_on_them():
    from references import reference_penalty

    g = torch.Generator().manual_seed(21)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(120, 5, generator=g, dtype=torch.float64, requires_grad=True)
    r = td.decorrelation_result([a, b], "t1", pooled=False, max_samples=64, generator=torch.Generator().manual_seed(0))
    rows_a, rows_b = r.rows[0].tolist(), r.rows[1].tolist()
    assert len(rows_a) == len(set(rows_a)) == 64 and len(rows_b) == len(set(rows_b)) == 64
    q = reference_penalty([a[rows_a], b[rows_b]], "t1")
    torch.testing.assert_close(r.value, q)
    ga, gb = torch.autograd.grad(r.value, [a, b])
    ha, hb = torch.autograd.grad(q, [a, b])
    torch.testing.assert_close(ga, ha)
    torch.testing.assert_close(gb, hb)
    unused = sorted(set(range(500)) - set(rows_a))
    assert bool((ga[unused] == 0).all()) and float(ga[rows_a].abs().sum()) > 0


def test_max_samples_pooled_layers_share_their_rows_and_small_layers_are_whole():
    g = torch.Generator().manual_seed(22)
    a = torch.randn(400, 4, generator=g, dtype=torch.float64)
    # b duplicates a's columns: only the same rows on both sides keep them perfectly correlated
    r = td.decorrelation_result([a, a.clone()], "t1", max_samples=50, generator=torch.Generator().manual_seed(1))
    assert r.clouds == (8,) and r.rows[0].shape == (50,)
    assert int((r.deaths[0] < 1e-12).sum()) == 4
    # a layer with no more rows than max_samples is used whole: the exact full-sample value
    small = torch.randn(40, 5, generator=g)
    torch.testing.assert_close(
        td.decorrelation_penalty([small], "t2", max_samples=40), td.decorrelation_penalty([small], "t2")
    )


def test_max_samples_is_seeded_and_checked():
    a = torch.randn(300, 5, generator=torch.Generator().manual_seed(23))

    def value(seed):
        return td.decorrelation_penalty([a], "t1", max_samples=32, generator=torch.Generator().manual_seed(seed))

    assert float(value(3)) == float(value(3)) and float(value(3)) != float(value(4))
    for bad in (1, 0, -5, 2.5, True):
        with pytest.raises(ValueError, match="max_samples must be an integer >= 2"):
            td.decorrelation_penalty([a], "t1", max_samples=bad)


def test_result_is_frozen_and_keeps_no_copy_of_the_clouds():
    import dataclasses

    acts, _ = _with_dead_columns(seed=5)
    r = td.decorrelation_result([acts.requires_grad_()], "t1")
    assert r.value.requires_grad and r.deaths[0].requires_grad
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.value = torch.zeros(())
    assert int(r.dead) == 3  # from the op's moments
    held = [f.name for f in dataclasses.fields(r) if isinstance(getattr(r, f.name), torch.Tensor)]
    assert held == ["value", "dead"] and r.dead.dim() == 0, "no (samples, neurons) cloud is kept"
    d = r.detached()
    assert not d.value.requires_grad and not d.deaths[0].requires_grad and int(d.dead) == 3
    assert isinstance(td.decorrelation_penalty([acts], "t1"), torch.Tensor)
    with pytest.raises(TypeError):
        td.decorrelation_penalty([acts], "t1", return_result=True)  # one function per return type


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(dissimilarity="cos"), r"unknown dissimilarity 'cos'; choose one of \('abs', 'sqrt'\)"),
        (dict(sampling="best"), "unknown sampling 'best'"),
        (dict(fraction=1.5), r"fraction must lie in \(0, 1\]"),
        (dict(alpha=2.0), r"alpha \(T2's trade-off\) must lie in \[0, 1\]"),
        (dict(dead_neurons="zero"), "unknown dead_neurons 'zero'"),
        (dict(max_samples=1), "max_samples must be an integer >= 2"),
        (dict(weight=float("nan")), "weight must be a finite number >= 0"),
        (dict(weight=-1.0), "weight must be a finite number >= 0"),
    ],
)
def test_pipeline_and_hooks_share_their_argument_checks(kw, msg):
    from torch import nn

    acts = [torch.randn(8, 3)]
    with pytest.raises(ValueError, match=msg):
        td.decorrelation_penalty(acts, **kw)
    with pytest.raises(ValueError, match=msg):
        td.Decorrelation(nn.Sequential(nn.Linear(3, 2)), **kw)
    if "sampling" in kw or "fraction" in kw:
        with pytest.raises(ValueError, match=msg):
            td.select_neurons(acts, [False], kw.get("sampling", "importance"), kw.get("fraction", 1.0))


@pytest.mark.slow
def test_per_layer_trees_come_from_one_batched_call(monkeypatch):
    import topodecorr.functional as F
    from references import reference_penalty

    calls = []
    real = F.tree_deaths

    def count(acts, *a, **k):
        calls.append(len(acts))
        return real(acts, *a, **k)

    monkeypatch.setattr(F, "tree_deaths", count)
    g = torch.Generator().manual_seed(31)
    acts = [torch.randn(40 + 10 * k, 3 + k, generator=g, dtype=torch.float64, requires_grad=True) for k in range(17)]
    p = td.decorrelation_penalty(acts, "t2", pooled=False)
    assert calls == [17]  # 17 clouds, one op call
    q = reference_penalty(acts, "t2")
    torch.testing.assert_close(p, q)
    for ga, ha in zip(torch.autograd.grad(p, acts), torch.autograd.grad(q, acts)):
        torch.testing.assert_close(ga, ha)



# --------------------------------------------------------------------------- channel maps without the copy


@pytest.mark.parametrize("pooled", [True, False])
def test_channel_maps_enter_the_op_as_they_are_and_equal_the_flattened_pipeline(monkeypatch, pooled):
    import topodecorr.functional as F

    seen = []
    real = F.tree_deaths

    def spy(acts, kind, backend, edges, block, layouts, *a, **k):
        seen.append([(tuple(x.shape), lay) for x, lay in zip(acts, layouts)])
        return real(acts, kind, backend, edges, block, layouts, *a, **k)

    monkeypatch.setattr(F, "tree_deaths", spy)
    g = torch.Generator().manual_seed(41)
    maps = [torch.randn(4, 6, 5, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, 5, generator=g,
                                                                                     dtype=torch.float64)]
    raw = [m.clone().requires_grad_(True) for m in maps]
    flat = [m.clone().requires_grad_(True) for m in maps]
    r1 = td.decorrelation_result(raw, "t2", pooled=pooled, modes=["channel", "channel"])
    r2 = td.decorrelation_result([flatten_activation(m, "channel") for m in flat], "t2", pooled=pooled)
    want = [((4, 9, 5, 5), "channel")] if pooled else [((4, 6, 5, 5), "channel"), ((4, 3, 5, 5), "channel")]
    assert seen[0] == want, "no (B * H * W, C) copy: the op reads the maps"
    torch.testing.assert_close(r1.value, r2.value, rtol=0, atol=1e-13)
    assert all(torch.equal(a, b) for a, b in zip(r1.edges, r2.edges))
    for a, b in zip(torch.autograd.grad(r1.value, raw), torch.autograd.grad(r2.value, flat)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_channel_maps_flattened_where_the_pipeline_needs_rows():
    """Row draws, neuron sampling and activation penalties flatten the map: the same results as by hand."""
    g = torch.Generator().manual_seed(42)
    m = torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64)
    flat = flatten_activation(m, "channel")
    for kw in ({"max_samples": 20}, {"sampling": "importance", "fraction": 0.5}, {}):
        for pen in ("t1", "decov"):
            a = td.decorrelation_result([m], pen, modes=["channel"], generator=torch.Generator().manual_seed(0), **kw)
            b = td.decorrelation_result([flat], pen, generator=torch.Generator().manual_seed(0), **kw)
            torch.testing.assert_close(a.value, b.value, rtol=0, atol=1e-13)
            assert int(a.dead) == int(b.dead) == 0
    m2 = m.clone()
    m2[:, 3] = 0.5  # a dead channel, dropped in its own layout
    a = td.decorrelation_result([m2], "t1", modes=["channel"], dead_neurons="drop")
    b = td.decorrelation_result([flatten_activation(m2, "channel")], "t1", dead_neurons="drop")
    torch.testing.assert_close(a.value, b.value, rtol=0, atol=1e-13)
    assert a.clouds == b.clouds == (7,) and int(a.dead) == int(b.dead) == 1 and a.dropped == 1
    with pytest.raises(ValueError, match="one entry per activation"):
        td.decorrelation_result([m], "t1", modes=["channel", "flatten"])
