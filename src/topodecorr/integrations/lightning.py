"""PyTorch Lightning: decorrelate a LightningModule's neurons with one callback.

::

    from topodecorr.integrations.lightning import DecorrelationCallback

    trainer = L.Trainer(callbacks=[DecorrelationCallback(penalty="t1", weight=1e-3)])
    trainer.fit(module)                      # the LightningModule is unchanged

How the penalty gets into the loss: for the duration of ``fit`` the callback
replaces the module's ``training_step`` *on the instance* by a wrapper that
attaches :class:`topodecorr.Decorrelation`'s forward hooks, calls the
original ``training_step``, and returns its loss plus ``weight * penalty``
(a returned tensor, or the ``"loss"`` entry of a returned dict). So the
penalty is part of the very loss Lightning back-propagates (one forward, one
backward), and everything Lightning does to that loss applies to it too:
the division by ``accumulate_grad_batches``, the precision plugin's autocast
(``precision="bf16-mixed"``: the statistics are float32) and, under DDP, the
strategy's forward redirection (the penalty is computed inside the DDP
forward; with the default ``distributed="global"`` it is the penalty of the
global batch, see :mod:`topodecorr.distributed`). The original method is put
back when ``fit`` ends or fails.

The hooks are attached from the start of ``training_step`` to the end of the
training batch (its backward included): validation, test, prediction and
other callbacks' forward passes are never captured. One
training forward of the module per ``training_step``: a second call of
``self(...)`` with gradients in the same step is a ``RuntimeError`` (two
batches' rows cannot share one point cloud); run an extra forward under
``torch.no_grad()``. Activation checkpointing inside the module, reentrant or
not, gives the penalty and gradients without it (see :mod:`topodecorr.neurons`). A
``training_step`` that returns ``None`` (skips the batch) gets no penalty.
With the default ``layers="auto"`` the module's activation-function modules
are hidden layers and, when ``training_step`` calls ``self(x)``, the
module's output is the output layer (see :mod:`topodecorr.capture`).

The step statistics (``penalty``, ``neurons``, ``dead``, ``min_death``,
``mean_death``, ``max_death``, ``skipped``) are logged with
``LightningModule.log_dict`` under ``decorrelation/NAME`` every
``log_every`` optimiser steps (default: the Trainer's
``log_every_n_steps``); only logged steps pay the statistics' host
synchronisation.

Manual optimisation (``automatic_optimization = False``) is refused: there
the module calls ``manual_backward`` itself; use ``topodecorr.Decorrelation``
inside its ``training_step`` instead.
"""

from __future__ import annotations

from typing import Any

import torch

try:  # the `lightning` package; the older standalone `pytorch_lightning` works the same
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError(
            "topodecorr.integrations.lightning needs PyTorch Lightning: pip install 'topodecorr[lightning]'"
        ) from exc

from ..capture import Decorrelation, check_options
from ..monitor import step_statistics

__all__ = ["DecorrelationCallback"]


class DecorrelationCallback(pl.Callback):
    """Add ``weight * penalty`` of the module's neurons to every training step's loss.

    Parameters
    ----------
    penalty : str
        ``"t1"``, ``"t2"``, ``"mean_abs_corr"``, ``"decov"`` or ``"none"`` (see
        :class:`topodecorr.Decorrelation`).
    weight : float
        lambda.
    log : bool
        Log the step statistics through the module's logger.
    log_every : int, optional
        Optimiser steps between two logged steps (default: ``trainer.log_every_n_steps``).
    prefix : str
        Name prefix of the logged statistics.
    **options
        Any other keyword of :class:`topodecorr.Decorrelation` (``layers``,
        ``sampling``, ``fraction``, ``mode``, ``pooled``, ``distributed``, ...),
        checked here (:func:`topodecorr.capture.check_options`). ``layers`` names
        and patterns are matched against ``pl_module.named_modules()`` when ``fit``
        starts (``layers=["net.1"]`` for ``self.net = nn.Sequential(...)``); module
        objects must belong to the fitted module.

    Attributes
    ----------
    regulariser : topodecorr.Decorrelation or None
        The regulariser of the running (or last) ``fit``.
    """

    def __init__(
        self,
        penalty: str = "t1",
        weight: float = 1e-3,
        *,
        log: bool = True,
        log_every: int | None = None,
        prefix: str = "decorrelation",
        **options: Any,
    ):
        if "model" in options:
            raise TypeError("DecorrelationCallback regularises the LightningModule it is fitted with; drop model=")
        if log_every is not None and not (isinstance(log_every, int) and log_every >= 1):
            raise ValueError(f"log_every must be an integer >= 1, got {log_every!r}")
        # every option checked now, without a model; layer names and modules are matched when fit starts
        check_options(penalty=penalty, weight=weight, **options)
        self.penalty = penalty
        self.weight = weight
        self.options = options
        self.log = log
        self.log_every = log_every
        self.prefix = prefix.rstrip("/")
        self.regulariser: Decorrelation | None = None
        self._module = None
        self._original = None

    # -- fit lifecycle -----------------------------------------------------------
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "DecorrelationCallback adds the penalty to the loss training_step returns, which manual "
                "optimisation (automatic_optimization = False) does not back-propagate; call "
                "topodecorr.Decorrelation(self, ...).penalty() inside your training_step instead"
            )
        self._restore()
        self.regulariser = Decorrelation(pl_module, penalty=self.penalty, weight=self.weight, **self.options)
        self._module = pl_module
        # the bound method, or the instance attribute another wrapper already put there
        self._original = pl_module.__dict__.get("training_step")
        original = pl_module.training_step
        every = self.log_every or max(1, int(getattr(trainer, "log_every_n_steps", 50)))

        def training_step(*args: Any, **kwargs: Any):
            reg = self.regulariser
            reg.attach()  # until the batch ends: a reentrant checkpoint's recompute in backward needs the hooks
            try:
                out = original(*args, **kwargs)
                if out is None:  # the module skips this batch
                    reg.close()
                    return None
                value = reg.penalty()
            except BaseException:
                reg.close()  # removes the hooks and drops anything captured
                raise
            loss = out if isinstance(out, torch.Tensor) else out.get("loss") if isinstance(out, dict) else None
            if not isinstance(loss, torch.Tensor):
                raise TypeError(
                    "training_step must return the loss tensor or a dict with a 'loss' tensor for "
                    f"DecorrelationCallback to add the penalty; it returned {type(out).__name__}"
                )
            total = loss + value
            if self.log and trainer.global_step % every == 0:
                stats = step_statistics(reg, value)
                if stats is not None:
                    pl_module.log_dict(
                        {f"{self.prefix}/{k}": float(v) for k, v in stats.items()},
                        on_step=True, on_epoch=False, batch_size=1,
                    )
            return total if isinstance(out, torch.Tensor) else {**out, "loss": total}

        pl_module.training_step = training_step  # type: ignore[method-assign]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.regulariser is not None:
            self.regulariser.close()  # backward and the optimiser step are done

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._restore()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        module, self._module = self._module, None
        if module is None:
            return
        if self._original is not None:
            module.training_step = self._original  # type: ignore[method-assign]
        else:
            module.__dict__.pop("training_step", None)  # the class's method again
        self._original = None
        if self.regulariser is not None:
            self.regulariser.close()
