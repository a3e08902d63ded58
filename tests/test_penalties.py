"""t1, t2, mean_abs_correlation, decov, l1, l2, decov_layer, act_l2 against closed forms and NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import strategies as S
from topodecorr import correlation, correlation_deaths, decov, l1, l2, mean_abs_correlation, t1, t2

deaths_arrays = arrays(
    np.float64, st.integers(1, 40), elements=st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False)
)


# --------------------------------------------------------------------------- T1


@given(deaths_arrays)
def test_t1_closed_form(d):
    out = t1(torch.from_numpy(d))
    assert out.shape == ()
    np.testing.assert_allclose(out.item(), np.sum(1.0 - d), rtol=1e-12, atol=1e-12)


def test_t1_gradient_is_minus_one():
    d = torch.rand(9, dtype=torch.float64, requires_grad=True)
    t1(d).backward()
    assert torch.equal(d.grad, -torch.ones(9, dtype=torch.float64))
    assert torch.autograd.gradcheck(t1, (d,))


def test_t1_empty_is_zero():
    d = torch.zeros(0, requires_grad=True)
    out = t1(d)
    assert out.item() == 0.0
    out.backward()


# --------------------------------------------------------------------------- T2


@given(deaths_arrays, st.floats(0.0, 1.0))
def test_t2_closed_form(d, alpha):
    out = t2(torch.from_numpy(d), alpha=alpha)
    expected = alpha * np.std(d) - (1 - alpha) * np.mean(d)  # np.std: population (ddof=0)
    np.testing.assert_allclose(out.item(), expected, rtol=1e-9, atol=1e-9)


def test_t2_default_alpha_is_half():
    d = torch.tensor([0.1, 0.4, 0.4, 0.9], dtype=torch.float64)
    expected = 0.5 * np.std(d.numpy()) - 0.5 * np.mean(d.numpy())
    assert t2(d).item() == pytest.approx(expected, abs=1e-12)


@given(deaths_arrays, st.floats(0.0, 1.0), st.floats(-0.5, 0.5))
@settings(max_examples=S.examples(30))
def test_t2_shift_property(d, alpha, c):
    # the std ignores a shift, the mean moves with it
    base = t2(torch.from_numpy(d), alpha).item()
    shifted = t2(torch.from_numpy(d + c), alpha).item()
    assert shifted == pytest.approx(base - (1 - alpha) * c, abs=1e-9)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_gradcheck_t2(alpha):
    g = torch.Generator().manual_seed(0)
    d = torch.rand(11, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d: t2(d, alpha), (d,))


def test_t2_equal_deaths_finite_gradient():
    for dtype in (torch.float32, torch.float64):
        d = torch.full((6,), 0.3, dtype=dtype, requires_grad=True)
        out = t2(d)
        assert out.item() == pytest.approx(-0.15, abs=1e-6)
        out.backward()
        assert torch.isfinite(d.grad).all()
        torch.testing.assert_close(d.grad, torch.full((6,), -0.5 / 6, dtype=dtype), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_t2_half_precision_equal_deaths_finite_gradient(dtype):
    d = torch.full((4,), 0.3, dtype=dtype, requires_grad=True)
    out = t2(d)
    assert out.dtype == torch.float32
    out.backward()
    assert torch.isfinite(d.grad.float()).all()
    torch.testing.assert_close(d.grad.float(), torch.full((4,), -0.125), rtol=0, atol=1e-3)


def test_t2_empty_and_single():
    assert t2(torch.zeros(0)).item() == 0.0
    d = torch.tensor([0.4], requires_grad=True)
    out = t2(d)
    assert out.item() == pytest.approx(-0.2, abs=1e-6)
    out.backward()
    assert torch.isfinite(d.grad).all()


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_t2_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match="alpha must lie in"):
        t2(torch.rand(4), alpha=alpha)


@pytest.mark.parametrize("fn", [t1, t2], ids=["t1", "t2"])
@pytest.mark.parametrize("bad", [torch.zeros(3, 3), torch.tensor(0.5), [0.1, 0.2]], ids=["2-D", "0-D", "list"])
def test_penalties_reject_non_vector_deaths(fn, bad):
    with pytest.raises(ValueError, match="deaths must be a 1-D tensor"):
        fn(bad)


def test_t1_t2_on_real_deaths_end_to_end():
    A = torch.from_numpy(S.make_activations("lowrank", 40, 12, seed=0)).requires_grad_(True)
    res = correlation_deaths(A)
    d = res.deaths.detach().numpy()
    assert t1(res.deaths).item() == pytest.approx(np.sum(1 - d), abs=1e-12)
    assert t2(res.deaths).item() == pytest.approx(0.5 * d.std() - 0.5 * d.mean(), abs=1e-9)
    (t1(res.deaths) + t2(res.deaths)).backward()
    assert torch.isfinite(A.grad).all() and A.grad.abs().sum() > 0


# --------------------------------------------------------------------------- mean |corr|


@given(S.activations(min_n=2, max_n=15))
@settings(max_examples=S.examples(30))
def test_mean_abs_correlation_numpy(case):
    family, seed, A = case
    C = correlation(torch.from_numpy(A))
    n = C.shape[0]
    Cn = C.numpy()
    expected = np.abs(Cn[~np.eye(n, dtype=bool)]).mean()
    assert mean_abs_correlation(C).item() == pytest.approx(expected, abs=1e-12)


def test_mean_abs_correlation_closed_form_and_gradient():
    C = torch.tensor([[1.0, -0.5, 0.2], [-0.5, 1.0, 0.0], [0.2, 0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    out = mean_abs_correlation(C)
    assert out.item() == pytest.approx((0.5 + 0.2 + 0.0) * 2 / 6)
    out.backward()
    assert C.grad[0, 1].item() == pytest.approx(-1 / 6) and C.grad[0, 2].item() == pytest.approx(1 / 6)
    assert torch.all(torch.diagonal(C.grad) == 0)


def test_gradcheck_mean_abs_correlation_through_correlation():
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: mean_abs_correlation(correlation(a)), (acts,))


def test_mean_abs_correlation_small_and_errors():
    assert mean_abs_correlation(torch.ones(1, 1)).item() == 0.0
    with pytest.raises(ValueError, match="square"):
        mean_abs_correlation(torch.ones(2, 3))
    with pytest.raises(ValueError, match="square"):
        mean_abs_correlation(torch.ones(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        mean_abs_correlation(np.eye(3))


# --------------------------------------------------------------------------- DeCov


def _decov_numpy(A):
    A = np.asarray(A, dtype=np.float64)
    xc = A - A.mean(0)
    cov = xc.T @ xc / A.shape[0]
    return 0.5 * (np.sum(cov**2) - np.sum(np.diag(cov) ** 2))


@given(S.activations(min_n=1, max_n=15))
@settings(max_examples=S.examples(30))
def test_decov_numpy(case):
    family, seed, A = case
    out = decov(torch.from_numpy(A))
    assert out.item() == pytest.approx(_decov_numpy(A), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("shape", [(3, 40), (40, 3), (7, 7)])
def test_decov_both_gram_sides_match_numpy(shape):
    """Fewer samples than neurons takes the (B, B) Gram, more takes the (n, n) one."""
    A = np.random.default_rng(4).normal(size=shape) * np.linspace(0.1, 3.0, shape[1])
    assert decov(torch.from_numpy(A)).item() == pytest.approx(_decov_numpy(A), rel=1e-12)
    f32 = decov(torch.from_numpy(A).float()).item()
    assert f32 == pytest.approx(_decov_numpy(A), rel=2e-4)  # float32 cancellation, both sides


def test_decov_closed_form():
    # two perfectly correlated neurons with variance 1: off-diagonal covariance 1 twice, halved
    assert decov(torch.tensor([[1.0, 1.0], [-1.0, -1.0]])).item() == pytest.approx(1.0)
    # uncorrelated (orthogonal centred columns): zero
    assert decov(torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])).item() == 0.0


def test_gradcheck_decov():
    g = torch.Generator().manual_seed(2)
    acts = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(decov, (acts,))
    wide = torch.randn(4, 11, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(decov, (wide,))


def test_decov_autocast_float32():
    acts = torch.randn(32, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = decov(acts)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(_decov_numpy(acts.float().numpy()), rel=1e-5)


def test_decov_errors():
    with pytest.raises(ValueError, match=r"shape \(batch, neurons\)"):
        decov(torch.zeros(5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        decov(np.zeros((4, 3)))


# --------------------------------------------------------------------------- L1, L2


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_l1_l2_match_numpy_and_include_biases():
    net = _net()
    flat = np.concatenate([p.detach().numpy().ravel() for p in net.parameters()])
    assert flat.size == 4 * 3 + 3 + 3 * 2 + 2
    assert l1(net).item() == pytest.approx(np.abs(flat).sum(), rel=1e-6)
    assert l2(net).item() == pytest.approx((flat**2).sum(), rel=1e-6)


def test_l1_l2_gradients():
    net = _net()
    l1(net).backward()
    for p in net.parameters():
        assert torch.equal(p.grad, torch.sign(p.detach()))
    net.zero_grad()
    l2(net).backward()
    for p in net.parameters():
        torch.testing.assert_close(p.grad, 2 * p.detach())


def test_l1_l2_skip_frozen_parameters():
    net = _net()
    net[0].weight.requires_grad_(False)
    frozen = net[0].weight.detach()
    full = _net()
    assert l1(net).item() == pytest.approx(l1(full).item() - frozen.abs().sum().item(), rel=1e-6)
    assert l2(net).item() == pytest.approx(l2(full).item() - (frozen**2).sum().item(), rel=1e-6)


def test_l1_l2_no_parameters_is_zero():
    assert l1(nn.ReLU()).item() == 0.0
    assert l2(nn.ReLU()).item() == 0.0


@pytest.mark.parametrize("fn", [l1, l2], ids=["l1", "l2"])
def test_l1_l2_reject_non_module(fn):
    with pytest.raises(TypeError, match="nn.Module"):
        fn(torch.zeros(3))


# --------------------------------------------------------------------------- the registry


def test_registry_covers_every_penalty_once_with_its_kind():
    from topodecorr.penalties import KINDS, REGISTRY

    assert dict((n, p.kind) for n, p in REGISTRY.items()) == {
        "none": "activations", "t1": "deaths", "t2": "deaths", "mean_abs_corr": "activations",
        "decov": "activations", "l1": "parameters", "l2": "parameters",
        "decov_layer": "activations", "act_l2": "activations",
    }
    assert all(p.name == n and p.kind in KINDS for n, p in REGISTRY.items())
    with pytest.raises(TypeError):
        REGISTRY["t3"] = REGISTRY["t1"]  # read-only


def test_registry_functions_agree_with_the_public_ones_and_numpy():
    from topodecorr.penalties import REGISTRY

    g = torch.Generator().manual_seed(5)
    d = torch.rand(9, generator=g, dtype=torch.float64)
    assert REGISTRY["t1"](d).item() == pytest.approx(np.sum(1 - d.numpy()), abs=1e-12)
    assert REGISTRY["t2"](d, alpha=0.3).item() == pytest.approx(
        0.3 * d.numpy().std() - 0.7 * d.numpy().mean(), abs=1e-12
    )
    A = torch.randn(30, 5, generator=g, dtype=torch.float64, requires_grad=True)
    C = np.corrcoef(A.detach().numpy(), rowvar=False)
    expected = np.abs(C[~np.eye(5, dtype=bool)]).mean()
    assert REGISTRY["mean_abs_corr"](A).item() == pytest.approx(expected, abs=1e-12)
    assert REGISTRY["decov"](A).item() == pytest.approx(_decov_numpy(A.detach().numpy()), rel=1e-10)
    z = REGISTRY["none"](A)
    assert z.item() == 0.0 and z.requires_grad  # a control with a graph
    net = _net()
    assert REGISTRY["l1"](net).item() == pytest.approx(l1(net).item())
    assert REGISTRY["l2"](net).item() == pytest.approx(l2(net).item())


def test_names_and_lookup_errors():
    from topodecorr.penalties import lookup, names

    assert names("deaths") == ("t1", "t2")
    assert names("parameters") == ("l1", "l2")
    assert set(names()) == {"none", "t1", "t2", "mean_abs_corr", "decov", "l1", "l2", "decov_layer", "act_l2"}
    with pytest.raises(ValueError, match="unknown penalty kind"):
        names("weights")
    with pytest.raises(ValueError, match=r"unknown penalty 't9'; choose one of"):
        lookup("t9")
    with pytest.raises(ValueError, match=r"acts on the model's parameters.*topodecorr.l2\(model\)"):
        lookup("l2", kinds=("deaths", "activations"))
    with pytest.raises(ValueError, match="is a deaths penalty"):
        lookup("t1", kinds=("activations",))


def test_pipeline_and_hooks_read_the_registry():
    import topodecorr as td
    from topodecorr.functional import PENALTIES
    from topodecorr.penalties import names

    assert PENALTIES == names("deaths", "activations")
    acts = torch.randn(16, 4)
    for name in ("l1", "l2"):
        with pytest.raises(ValueError, match="parameters"):
            td.decorrelation_penalty([acts], name)
        with pytest.raises(ValueError, match="parameters"):
            td.Decorrelation(_net(), penalty=name)


# --------------------------------------------------------------------------- DeCov per layer, activation L2


def test_act_l2_closed_form_gradient_and_numpy():
    from topodecorr.penalties import act_l2

    assert act_l2(torch.tensor([[1.0, 2.0], [3.0, 0.0]])).item() == 7.0  # (1 + 4 + 9) / 2
    g = torch.Generator().manual_seed(1)
    A = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    a = A.detach().numpy()
    assert act_l2(A).item() == pytest.approx(np.sum(a**2) / 12, rel=1e-12)
    act_l2(A).backward()
    np.testing.assert_allclose(A.grad.numpy(), 2 * a / 12, rtol=1e-12)  # d/dA ||A||^2 / B = 2A / B
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = act_l2(A.detach().float())
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(batch, neurons\)"):
        act_l2(torch.ones(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        act_l2(np.ones((2, 2)))


def test_act_l2_is_a_scale_not_a_correlation():
    """Scaling the activations by c scales act_l2 by c^2 and leaves their correlations alone."""
    from topodecorr.penalties import REGISTRY, act_l2

    g = torch.Generator().manual_seed(2)
    A = torch.randn(40, 6, generator=g, dtype=torch.float64)
    assert act_l2(3 * A).item() == pytest.approx(9 * act_l2(A).item(), rel=1e-12)
    assert REGISTRY["mean_abs_corr"](3 * A).item() == pytest.approx(REGISTRY["mean_abs_corr"](A).item(), rel=1e-12)
    assert REGISTRY["act_l2"](A).item() == act_l2(A).item()


def test_act_l2_pooled_equals_per_layer():
    import topodecorr as td

    g = torch.Generator().manual_seed(3)
    h, out = torch.randn(16, 7, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    expected = (np.sum(h.numpy() ** 2) + np.sum(out.numpy() ** 2)) / 16
    for pooled in (True, False):
        assert td.decorrelation_penalty([h, out], "act_l2", weight=0.5, pooled=pooled).item() == pytest.approx(
            0.5 * expected, rel=1e-12)


def test_decov_layer_is_the_sum_over_hidden_layers_without_the_logits():
    """Cogswell et al.'s DeCov: each hidden layer its own covariance; the output layer left out."""
    import topodecorr as td

    g = torch.Generator().manual_seed(4)
    h1 = torch.randn(32, 6, generator=g, dtype=torch.float64)
    h2 = torch.randn(32, 4, generator=g, dtype=torch.float64) + h1[:, :1]  # correlated with h1
    out = torch.randn(32, 3, generator=g, dtype=torch.float64)
    expected = _decov_numpy(h1.numpy()) + _decov_numpy(h2.numpy())
    for pooled in (True, False):  # always per layer
        got = td.decorrelation_penalty([h1, h2, out], "decov_layer", weight=2.0, pooled=pooled)
        assert got.item() == pytest.approx(2.0 * expected, rel=1e-10)
    # the pooled "decov" also counts the covariances between layers and of the logits: larger here
    pooled_all = td.decorrelation_penalty([h1, h2, out], "decov").item()
    assert pooled_all == pytest.approx(_decov_numpy(np.hstack([h1.numpy(), h2.numpy(), out.numpy()])), rel=1e-10)
    assert pooled_all > expected
    # layers with different sample counts are fine (no pooled cloud)
    wide = torch.randn(64, 5, generator=g, dtype=torch.float64)
    got = td.decorrelation_penalty([wide, h2, out], "decov_layer")
    assert got.item() == pytest.approx(_decov_numpy(wide.numpy()) + _decov_numpy(h2.numpy()), rel=1e-10)


def test_decov_layer_through_the_hooks_reads_the_hidden_relus():
    import topodecorr as td

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(20, 5, dtype=torch.float64)
    with torch.no_grad():
        h1 = net[1](net[0](x))
        h2 = net[3](net[2](h1))
    expected = _decov_numpy(h1.numpy()) + _decov_numpy(h2.numpy())
    with td.Decorrelation(net, penalty="decov_layer", weight=0.1) as reg:
        net(x)
        value = reg.penalty()
    assert value.item() == pytest.approx(0.1 * expected, rel=1e-10)
    value.backward()  # a graph to the weights
    assert net[0].weight.grad.abs().sum() > 0
    assert not net[4].weight.grad.any()  # the logits carry no DeCov
