"""Networks: shapes on every dataset's input shape, parameter counts in closed form, layer structure."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from topodecorr.experiments.models import MODELS, PAPER_NETWORKS, build_model, count_parameters, model_defaults

IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (2, 5, 7), (1, 1, 1)]
VECTOR_SHAPES = [(40,), (64,)]


def dense_params(widths):
    """Parameters of a chain of Linear layers widths[0] -> widths[1] -> ... (weights + biases)."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def test_names():
    assert PAPER_NETWORKS == ("mlp", "mlp-dropout", "mlp-deep")
    assert set(MODELS) == {*PAPER_NETWORKS, "vgg", "cnn1d", "cnn2d"}


def test_cnn2d_structure_count_and_channel_neurons():
    """The small 2-D CNN: two conv stages (16, 32 channels), a 128-unit head; every channel a neuron."""
    import topodecorr as td

    net = build_model("cnn2d", (1, 28, 28), 10)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU",
                     "Linear"]
    # closed form: 3x3 convolutions 1 -> 16 -> 32, a 32 x 7 x 7 map into 128 units, 10 logits
    expected = (16 * 9 + 16) + (32 * 16 * 9 + 32) + dense_params([32 * 7 * 7, 128, 10])
    assert count_parameters(net) == expected == 206_922
    x = torch.randn(8, 1, 28, 28)
    with td.Decorrelation(net, penalty="t1", mode="channel", pooled=False) as reg:
        net(x)
        reg.penalty()
    assert reg.last_stats.clouds == (16, 32, 128, 10)  # a tree per layer, every channel a neuron
    with pytest.raises(ValueError, match="'cnn2d' needs image inputs"):
        build_model("cnn2d", (40,), 10)


def test_cnn1d_shapes_neurons_and_bad_input():
    import topodecorr as td

    net = build_model("cnn1d", (40,), 10)
    assert net(torch.zeros(3, 40)).shape == (3, 10)
    assert build_model("cnn1d", (2, 33), 4)(torch.zeros(5, 2, 33)).shape == (5, 4)
    with td.Decorrelation(net, penalty="t1") as reg:
        net(torch.randn(64, 40))
        reg.penalty()
    assert reg.last_stats.neurons == 16 * 20 + 32 * 10 + 64 + 10
    with pytest.raises(ValueError, match="sequence inputs"):
        build_model("cnn1d", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="odd"):
        build_model("cnn1d", (40,), 10, kernel_size=4)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", IMAGE_SHAPES + VECTOR_SHAPES, ids=str)
def test_forward_shapes(name, shape):
    if name in ("vgg", "cnn2d") and len(shape) != 3:
        with pytest.raises(ValueError, match="image inputs"):
            build_model(name, shape, 10)
        return
    if name == "cnn1d" and len(shape) > 2:
        with pytest.raises(ValueError, match="sequence inputs"):
            build_model(name, shape, 10)
        return
    params = {"width": 4, "dense": (8,)} if name == "vgg" else {}
    net = build_model(name, shape, 7, **params)
    out = net(torch.rand(3, *shape))
    assert out.shape == (3, 7) and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_paper_mlp_parameter_counts():
    assert count_parameters(build_model("mlp", (1, 28, 28), 10)) == (
        784 * 450 + 450 + 450 * 350 + 350 + 350 * 200 + 200 + 200 * 10 + 10
    ) == 583310
    assert count_parameters(build_model("mlp-dropout", (784,), 10)) == 583310
    assert count_parameters(build_model("mlp-deep", (1, 28, 28), 10)) == dense_params([784, 300, 250, 200, 150, 100, 10])
    # input size adapts to the dataset
    assert count_parameters(build_model("mlp", (1, 8, 8), 10)) == dense_params([64, 450, 350, 200, 10])
    assert count_parameters(build_model("mlp", (3, 32, 32), 10)) == dense_params([3072, 450, 350, 200, 10])
    assert count_parameters(build_model("mlp", (40,), 10, hidden=(5, 6))) == dense_params([40, 5, 6, 10])


@pytest.mark.parametrize("name,hidden", [("mlp", (450, 350, 200)), ("mlp-dropout", (450, 350, 200)),
                                          ("mlp-deep", (300, 250, 200, 150, 100))])
def test_mlp_structure_for_the_auto_layer_rule(name, hidden):
    net = build_model(name, (1, 28, 28), 10)
    assert type(net) is nn.Sequential and isinstance(net[0], nn.Flatten)
    mods = list(net)
    relus = [i for i, m in enumerate(mods) if isinstance(m, nn.ReLU)]
    # every hidden Linear is directly followed by its own ReLU module
    assert [mods[i - 1].out_features for i in relus] == list(hidden)
    assert isinstance(mods[-1], nn.Linear) and mods[-1].out_features == 10
    # the auto rule captures the hidden ReLUs plus the output layer: 1010 neurons on MNIST
    assert sum(hidden) + 10 == 1010
    drops = [m for m in mods if isinstance(m, nn.Dropout)]
    if name == "mlp-dropout":
        assert len(drops) == 3 and all(d.p == 0.5 for d in drops)
        assert all(isinstance(mods[i + 1], nn.Dropout) for i in relus)  # dropout after each hidden ReLU
    else:
        assert drops == []


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    net = build_model("mlp-dropout", (64,), 10)
    x = torch.rand(4, 64)
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))
    assert count_parameters(build_model("mlp", (64,), 10, dropout=0.25)) == count_parameters(net)
    assert [m.p for m in build_model("mlp", (64,), 10, hidden=(3, 3), dropout=0.25) if isinstance(m, nn.Dropout)] == [0.25, 0.25]


def vgg_params(c_in, widths_per_conv, dense, classes, features):
    convs = 0
    for out in widths_per_conv:
        convs += c_in * out * 9 + out
        c_in = out
    return convs + dense_params([features, *dense, classes])


def test_vgg_structure_and_counts():
    net = build_model("vgg", (3, 32, 32), 10, depth=3, width=16, convs_per_stage=2, dense=(64,))
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64]  # doubling width
    assert sum(isinstance(m, nn.MaxPool2d) for m in net) == 3
    assert count_parameters(net) == vgg_params(3, [16, 16, 32, 32, 64, 64], [64], 10, 64)
    # a separate ReLU after every conv and every hidden dense layer
    mods = list(net)
    assert sum(isinstance(m, nn.ReLU) for m in mods) == 6 + 1
    assert all(isinstance(mods[i + 1], nn.ReLU) for i, m in enumerate(mods) if isinstance(m, nn.Conv2d))

    flat = build_model("vgg", (3, 32, 32), 10, depth=2, width=8, convs_per_stage=1, dense=(), pool="flatten")
    assert count_parameters(flat) == vgg_params(3, [8, 16], [], 10, 16 * 8 * 8)
    assert flat(torch.rand(2, 3, 32, 32)).shape == (2, 10)

    capped = build_model("vgg", (1, 8, 8), 10, depth=4, width=8, max_width=16, convs_per_stage=1)
    assert [c.out_channels for c in capped if isinstance(c, nn.Conv2d)] == [8, 16, 16, 16]
    assert sum(isinstance(m, nn.MaxPool2d) for m in capped) == 3  # 8 -> 4 -> 2 -> 1, then no more pooling


def test_vgg_batch_norm_and_dropout():
    net = build_model("vgg", (1, 28, 28), 10, depth=2, width=4, batch_norm=True, dropout=0.5, dense=(16, 8))
    mods = list(net)
    bns = [i for i, m in enumerate(mods) if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 4 and all(isinstance(mods[i - 1], nn.Conv2d) and isinstance(mods[i + 1], nn.ReLU) for i in bns)
    assert all(m.bias is None for m in mods if isinstance(m, nn.Conv2d))
    assert [m.p for m in mods if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    assert not any(isinstance(m, nn.Dropout) for m in build_model("vgg", (1, 8, 8), 10))


def test_glorot_init_and_seeding():
    torch.manual_seed(1)
    a = build_model("mlp", (64,), 10)
    torch.manual_seed(1)
    b = build_model("mlp", (64,), 10)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    for m in a:
        if isinstance(m, nn.Linear):
            m = m.requires_grad_(False)
            bound = math.sqrt(6.0 / (m.in_features + m.out_features))
            assert float(m.bias.abs().max()) == 0.0
            assert float(m.weight.abs().max()) <= bound and float(m.weight.abs().max()) > 0.9 * bound
    t = build_model("mlp", (64,), 10, init="torch")
    assert float(t[1].bias.detach().abs().max()) > 0


def test_defaults_are_copies():
    d = model_defaults("mlp")
    d["hidden"] = (1,)
    assert model_defaults("mlp")["hidden"] == (450, 350, 200)
    assert model_defaults("mlp-dropout")["dropout"] == 0.5


@pytest.mark.parametrize(
    "name,shape,classes,params,match",
    [
        ("resnet", (1, 8, 8), 10, {}, "unknown network"),
        ("mlp", (1, 8, 8), 10, {"depth": 3}, "unknown parameter.*depth"),
        ("vgg", (1, 8, 8), 10, {"hidden": (3,)}, "unknown parameter.*hidden"),
        ("mlp", (1, 8, 8), 10, {"hidden": ()}, "at least one"),
        ("mlp", (1, 8, 8), 10, {"hidden": (0, 3)}, "hidden"),
        ("mlp", (1, 8, 8), 10, {"hidden": "450"}, "sequence"),
        ("mlp", (1, 8, 8), 10, {"hidden": (2.5,)}, "hidden"),
        ("mlp", (1, 8, 8), 10, {"dropout": 1.0}, "dropout"),
        ("mlp", (1, 8, 8), 10, {"dropout": -0.1}, "dropout"),
        ("mlp", (1, 8, 8), 10, {"dropout": True}, "dropout"),
        ("mlp", (1, 8, 8), 10, {"init": "he"}, "init"),
        ("vgg", (1, 8, 8), 10, {"depth": 0}, "depth"),
        ("vgg", (1, 8, 8), 10, {"width": 2.0}, "width"),
        ("vgg", (1, 8, 8), 10, {"batch_norm": 1}, "batch_norm"),
        ("vgg", (1, 8, 8), 10, {"pool": "max"}, "pool"),
        ("vgg", (1, 8, 8), 10, {"dense": (-1,)}, "dense"),
        ("vgg", (64,), 10, {}, "image inputs"),
        ("mlp", (1, 8, 8), 1, {}, "num_classes"),
        ("mlp", (), 10, {}, "input_shape"),
        ("mlp", (0, 28), 10, {}, "input_shape"),
        ("mlp", 784, 10, {}, "input_shape"),
    ],
)
def test_bad_names_and_params(name, shape, classes, params, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, shape, classes, **params)
