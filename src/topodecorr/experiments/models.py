"""Networks of the reproduction: the paper's three MLPs and a VGG-style CNN family.

Every model is a flat :class:`torch.nn.Sequential` whose nonlinearities are separate
``nn.ReLU`` modules, so the training API's automatic layer rule ("hidden layers after
their nonlinearity, plus the output layer") finds them. Input ``(B, *input_shape)``,
output logits ``(B, num_classes)``.

Networks (:data:`MODELS`)
-------------------------
``mlp``
    ``Flatten, [Linear, ReLU, (Dropout)] * len(hidden), Linear`` with
    ``hidden=(450, 350, 200)``, ``dropout=0.0``: the paper's 784-450-350-200-10 on MNIST
    (the input width is ``prod(input_shape)``, so it adapts to every dataset).
    Parameters on 784 inputs and 10 classes:
    ``784*450+450 + 450*350+350 + 350*200+200 + 200*10+10 = 583 310``.
``mlp-dropout``
    The same with ``dropout=0.5`` after every hidden ReLU.
``mlp-deep``
    ``hidden=(300, 250, 200, 150, 100)``: the paper's 784-300-250-200-150-100-10.
``vgg``
    A family standing in for the VGG-style CIFAR-10 networks of the PGDL competition's
    task 1: ``depth`` stages of ``convs_per_stage`` 3x3 convolutions (padding 1,
    optional ``batch_norm`` before each ReLU), the first stage ``width`` channels and
    each next one twice as many (at most ``max_width``), each stage ending in a 2x2
    max-pooling while the map is at least 2x2; then ``pool="global"`` (global average
    pooling) or ``"flatten"``; then a dense head ``dense=(256,)`` of ReLU layers each
    followed by ``Dropout(dropout)`` when ``dropout > 0``, and the output layer. Works
    on any image shape ``(C, H, W)``: digits 8x8, MNIST 28x28, CIFAR-10 32x32.
``cnn2d``
    A small 2-D CNN for 28x28 images (the ``vgg`` builder with other defaults):
    ``Conv2d(16, 3x3), ReLU, MaxPool 2``, ``Conv2d(32, 3x3), ReLU, MaxPool 2``, ``Flatten``,
    a dense ``(128,)`` ReLU head and the output layer. On 1x28x28 inputs:
    ``16*9+16 + 32*16*9+32 + 32*7*7*128+128 + 128*10+10 = 206 922`` parameters; its
    convolutions have 16 and 32 channels (``mode="channel"``: 16 + 32 neurons, a tree
    per layer) or 16*28*28 + 32*14*14 = 18 816 flattened neurons.
``cnn1d``
    A small 1-D CNN for sequence data such as MNIST-1D (input ``(L,)`` or ``(C, L)``):
    ``channels=(16, 32)`` convolutions of ``kernel_size=5`` (padding 2, stride 2, so
    each halves the length), each followed by a ReLU, then ``Flatten``, a dense
    ``dense=(64,)`` ReLU head and the output layer. On MNIST-1D (40 samples) the automatic
    layer rule captures 16*20 + 32*10 + 64 + 10 = 714 neurons.

The three MLPs accept ``hidden`` and ``dropout`` (the name only picks the defaults);
all models accept ``init``: ``"glorot"`` (default: Glorot-uniform weights and zero
biases, the Keras defaults of the paper's and PGDL's networks) or ``"torch"``
(PyTorch's own defaults).

What the automatic layer rule captures
--------------------------------------
* MLPs: every hidden ``ReLU`` output (before dropout, as in the paper's Keras models
  where dropout is a layer after the activation) and the final ``Linear`` (logits).
  On 784 inputs: ``mlp`` and ``mlp-dropout`` 450 + 350 + 200 + 10 = 1010 neurons,
  ``mlp-deep`` 300 + 250 + 200 + 150 + 100 + 10 = 1010 neurons.
* ``vgg``: every convolutional ``ReLU`` output (flattened, ``C*H*W`` neurons each, so
  importance sampling with a small fraction, the paper's p = 0.005, is the practical
  choice), every dense ``ReLU`` output, and the logits.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from torch import nn

# torch is imported inside the builders: the names and defaults below serve the command
# line's --help and the configuration checks, which must not wait for torch.

__all__ = ["MODELS", "PAPER_NETWORKS", "build_model", "model_defaults", "count_parameters"]

#: The MLPs of the paper's MNIST experiments.
PAPER_NETWORKS = ("mlp", "mlp-dropout", "mlp-deep")

#: Every name :func:`build_model` accepts.
MODELS = (*PAPER_NETWORKS, "vgg", "cnn1d", "cnn2d")

_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": (450, 350, 200), "dropout": 0.0, "init": "glorot"},
    "mlp-dropout": {"hidden": (450, 350, 200), "dropout": 0.5, "init": "glorot"},
    "mlp-deep": {"hidden": (300, 250, 200, 150, 100), "dropout": 0.0, "init": "glorot"},
    "vgg": {
        "depth": 3,
        "width": 32,
        "convs_per_stage": 2,
        "max_width": 512,
        "batch_norm": False,
        "dropout": 0.0,
        "dense": (256,),
        "pool": "global",
        "init": "glorot",
    },
    "cnn1d": {"channels": (16, 32), "kernel_size": 5, "dense": (64,), "dropout": 0.0, "init": "glorot"},
}
# the small 2-D CNN: two 3x3 stages of one convolution each (16, 32 channels), flattened into a dense head
_DEFAULTS["cnn2d"] = {**_DEFAULTS["vgg"], "depth": 2, "width": 16, "convs_per_stage": 1, "dense": (128,),
                      "pool": "flatten"}


def model_defaults(name: str) -> dict[str, Any]:
    """The default keyword parameters of network ``name`` (a fresh dict).

    >>> model_defaults("mlp-deep")["hidden"]
    (300, 250, 200, 150, 100)
    """
    _check_name(name)
    return dict(_DEFAULTS[name])


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **params: Any) -> nn.Sequential:
    """Build network ``name`` for inputs of shape ``input_shape`` and ``num_classes`` classes.

    Parameters
    ----------
    name : str
        One of :data:`MODELS`.
    input_shape : sequence of int
        Shape of one sample, e.g. ``(1, 28, 28)``; MLPs flatten it, ``vgg`` needs ``(C, H, W)``.
    num_classes : int
        Number of output logits (at least 2).
    **params
        Network parameters (see the module docstring and :func:`model_defaults`).

    Returns
    -------
    torch.nn.Sequential
        Maps ``(B, *input_shape)`` to logits ``(B, num_classes)``.

    Raises
    ------
    ValueError
        Unknown name or parameter, or a parameter or shape out of range.

    Examples
    --------
    >>> import torch
    >>> net = build_model("mlp", (1, 28, 28), 10)
    >>> net(torch.zeros(2, 1, 28, 28)).shape, count_parameters(net)
    (torch.Size([2, 10]), 583310)
    >>> build_model("vgg", (1, 8, 8), 10, depth=2, width=8)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    _check_name(name)
    unknown = sorted(set(params) - set(_DEFAULTS[name]))
    if unknown:
        raise ValueError(
            f"network {name!r}: unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(sorted(_DEFAULTS[name]))}"
        )
    cfg = {**_DEFAULTS[name], **params}
    shape = _check_shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    init = cfg["init"]
    if init not in ("glorot", "torch"):
        raise ValueError(f"network {name!r}: init must be 'glorot' or 'torch', got {init!r}")
    if name in ("vgg", "cnn2d"):
        model = _vgg(name, shape, num_classes, cfg)
    elif name == "cnn1d":
        model = _cnn1d(name, shape, num_classes, cfg)
    else:
        model = _mlp(name, shape, num_classes, cfg)
    if init == "glorot":
        _glorot(model)
    return model


# -- helpers -----------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown network {name!r}; choose one of {', '.join(MODELS)}")


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be a sequence of positive integers, got {input_shape!r}") from None
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"input_shape must be a non-empty sequence of positive integers, got {input_shape!r}")
    return shape


def _positive_int(name: str, key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"network {name!r}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _widths(name: str, key: str, value: Any, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"network {name!r}: {key} must be a sequence of layer widths, got {value!r}")
    widths = tuple(value)
    if not widths and not allow_empty:
        raise ValueError(f"network {name!r}: {key} needs at least one hidden layer")
    for w in widths:
        _positive_int(name, f"every width in {key}", w)
    return widths


def _dropout(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"network {name!r}: dropout must be a probability in [0, 1), got {value!r}")
    return float(value)


def _dense_stack(in_features: int, widths: tuple[int, ...], dropout: float, num_classes: int) -> list[nn.Module]:
    from torch import nn

    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(in_features, w), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = w
    layers.append(nn.Linear(in_features, num_classes))
    return layers


def _mlp(name: str, shape: tuple[int, ...], num_classes: int, cfg: dict[str, Any]) -> nn.Sequential:
    from torch import nn

    hidden = _widths(name, "hidden", cfg["hidden"], allow_empty=False)
    dropout = _dropout(name, cfg["dropout"])
    return nn.Sequential(nn.Flatten(), *_dense_stack(math.prod(shape), hidden, dropout, num_classes))


def _vgg(name: str, shape: tuple[int, ...], num_classes: int, cfg: dict[str, Any]) -> nn.Sequential:
    from torch import nn

    if len(shape) != 3:
        raise ValueError(
            f"network {name!r} needs image inputs of shape (channels, height, width), got input_shape={shape}; "
            "use an MLP for vector data such as mnist1d"
        )
    depth = _positive_int(name, "depth", cfg["depth"])
    width = _positive_int(name, "width", cfg["width"])
    per_stage = _positive_int(name, "convs_per_stage", cfg["convs_per_stage"])
    max_width = _positive_int(name, "max_width", cfg["max_width"])
    if not isinstance(cfg["batch_norm"], bool):
        raise ValueError(f"network {name!r}: batch_norm must be true or false, got {cfg['batch_norm']!r}")
    dropout = _dropout(name, cfg["dropout"])
    dense = _widths(name, "dense", cfg["dense"], allow_empty=True)
    if cfg["pool"] not in ("global", "flatten"):
        raise ValueError(f"network {name!r}: pool must be 'global' or 'flatten', got {cfg['pool']!r}")

    channels, h, w = shape
    layers: list[nn.Module] = []
    for stage in range(depth):
        out = min(width * 2**stage, max_width)
        for _ in range(per_stage):
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=not cfg["batch_norm"]))
            if cfg["batch_norm"]:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            channels = out
        if h >= 2 and w >= 2:  # halve the map while there is something to halve
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
    if cfg["pool"] == "global":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        features = channels
    else:
        layers.append(nn.Flatten())
        features = channels * h * w
    layers += _dense_stack(features, dense, dropout, num_classes)
    return nn.Sequential(*layers)


def _cnn1d(name: str, shape: tuple[int, ...], num_classes: int, cfg: dict[str, Any]) -> nn.Sequential:
    from torch import nn

    if len(shape) not in (1, 2):
        raise ValueError(
            f"network 'cnn1d' needs sequence inputs of shape (length,) or (channels, length), got input_shape={shape}"
        )
    channels_in, length = (1, shape[0]) if len(shape) == 1 else shape
    widths = _widths(name, "channels", cfg["channels"], allow_empty=False)
    k = _positive_int(name, "kernel_size", cfg["kernel_size"])
    if k % 2 == 0:
        raise ValueError(f"network 'cnn1d': kernel_size must be odd (padding keeps the centre), got {k}")
    dense = _widths(name, "dense", cfg["dense"], allow_empty=True)
    dropout = _dropout(name, cfg["dropout"])
    layers: list[nn.Module] = [nn.Unflatten(1, (1, length))] if len(shape) == 1 else []
    for out in widths:
        layers += [nn.Conv1d(channels_in, out, kernel_size=k, stride=2, padding=k // 2), nn.ReLU()]
        channels_in, length = out, (length + 2 * (k // 2) - k) // 2 + 1
    layers.append(nn.Flatten())
    layers += _dense_stack(channels_in * length, dense, dropout, num_classes)
    return nn.Sequential(*layers)


def _glorot(model: nn.Module) -> None:
    """Glorot-uniform weights and zero biases on every Linear and Conv1d/2d (Keras' defaults)."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
