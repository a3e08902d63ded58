"""Hugging Face ``transformers.Trainer``: decorrelate a model's neurons with one callback.

::

    from topodecorr.integrations.transformers import DecorrelationCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[DecorrelationCallback(penalty="t1", weight=1e-3)])
    trainer.train()

How the penalty gets into the loss: a ``TrainerCallback`` cannot change the
loss, so when training begins the callback attaches
:class:`topodecorr.Decorrelation`'s hooks to the model, which record every
training forward (training mode, gradients enabled), and registers one more
forward hook on the model that adds ``weight * penalty`` to the ``loss`` of
its output. The Trainer's ``compute_loss`` takes that ``loss`` and
back-propagates it: one forward, one backward, and the penalty's gradient
flows through the same graph (under DDP the hooks run inside the DDP forward,
and with the default ``distributed="global"`` the penalty is that of the
global batch). Evaluation and prediction run in ``eval()`` mode without
gradients: nothing is captured, ``eval_loss`` is the task loss. The hooks are
removed when training ends.

Gradient checkpointing (``TrainingArguments(gradient_checkpointing=True)``,
reentrant or not): the recompute in ``backward()`` is not captured again, and
the penalty and gradients are those without checkpointing (see
:mod:`topodecorr.neurons`; the reentrant variant's gradient reaches the blocks
through their recompute).

Scaling, so that the penalty has the weight of one micro-batch's mean loss as
in a plain loop: when the Trainer normalises the loss itself (it passes
``num_items_in_batch`` to a model that accepts loss keywords, as GPT-2 does)
it does not divide by ``gradient_accumulation_steps``, so the callback divides
the penalty by it (a shorter last accumulation window of an epoch is divided
by the configured number all the same); when ``average_tokens_across_devices``
makes the Trainer multiply that loss by the number of processes, the penalty
is divided by it too. Otherwise the Trainer divides the whole loss, penalty
included.

The model must compute the loss (pass ``labels``): with
``label_smoothing_factor`` or ``compute_loss_func`` the Trainer computes the
loss from the logits outside the model, where no hook can reach it; the
callback then raises ``RuntimeError`` instead of silently training without
the penalty.

Layers: the default ``layers="auto"`` finds the transformer blocks and reads
each block's feed-forward hidden units per token (``mode="features_last"``,
one point cloud per block; see :mod:`topodecorr.neurons`). ``layers=`` takes
module names or patterns of ``model.named_modules()`` (``["transformer.h.*.mlp.act"]``
for GPT-2) or modules of the model, checked when the callback is built and
matched when training begins.

Statistics: every training log of the Trainer (``logging_steps``) gains
``decorrelation/penalty`` (the mean weighted penalty since the last log) and
``decorrelation/neurons``, ``dead``, ``min_death``, ``mean_death``,
``max_death`` of the last step, in ``trainer.state.log_history`` and in the
``logs`` the callbacks after this one receive (the console printer, the
progress bar). The Trainer runs its ``report_to`` integrations (TensorBoard,
W&B, ...) *before* the user's callbacks; to have the statistics there as well,
put this callback first: ``trainer.callback_handler.callbacks.insert(0,
trainer.pop_callback(cb))``.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "topodecorr.integrations.transformers needs Hugging Face transformers: pip install 'topodecorr[models]'"
    ) from exc

from ..capture import Decorrelation, check_options
from ..monitor import step_statistics

__all__ = ["DecorrelationCallback"]


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class DecorrelationCallback(TrainerCallback):
    """Add ``weight * penalty`` of the model's neurons to the loss of every training forward.

    Parameters
    ----------
    penalty : str
        ``"t1"``, ``"t2"``, ``"mean_abs_corr"``, ``"decov"`` or ``"none"`` (see
        :class:`topodecorr.Decorrelation`).
    weight : float
        lambda.
    prefix : str
        Prefix of the statistics' names in the Trainer's logs.
    **options
        Any other keyword of :class:`topodecorr.Decorrelation` (``layers``, ``mode``,
        ``pooled``, ``sampling``, ``distributed``, ...).

    Attributes
    ----------
    regulariser : topodecorr.Decorrelation or None
        The regulariser of the running (or last) training.
    """

    def __init__(self, penalty: str = "t1", weight: float = 1e-3, *, prefix: str = "decorrelation", **options: Any):
        if "model" in options:
            raise TypeError("DecorrelationCallback regularises the Trainer's model; drop model=")
        # every option checked now, without a model; layer names and modules are matched when training starts
        check_options(penalty=penalty, weight=weight, **options)
        self.penalty = penalty
        self.weight = weight
        self.options = options
        self.prefix = prefix.rstrip("/")
        self.regulariser: Decorrelation | None = None
        self._handle = None
        self._args = None
        self._sum: torch.Tensor | float = 0.0
        self._count = 0

    # -- training lifecycle ------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("the Trainer passed no model to DecorrelationCallback.on_train_begin")
        if getattr(args, "label_smoothing_factor", 0) and args.label_smoothing_factor > 0:
            raise RuntimeError(
                "with label_smoothing_factor > 0 the Trainer computes the loss outside the model, where "
                "DecorrelationCallback cannot add the penalty; set label_smoothing_factor=0 (or override "
                "Trainer.compute_loss and add topodecorr.Decorrelation(model, ...).penalty() there)"
            )
        self._remove()
        self._args = args
        self.regulariser = Decorrelation(model, penalty=self.penalty, weight=self.weight, **self.options)
        self._sum, self._count = 0.0, 0
        # the regulariser's hooks record every training forward (training mode, gradients enabled);
        # this hook, registered after them, adds the penalty to that forward's loss
        self.regulariser.attach()
        self._handle = model.register_forward_hook(self._after_forward, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self._count == 0 or "loss" not in logs:
            return  # an evaluation log, or nothing regularised since the last one
        stats = step_statistics(self.regulariser) or {}
        stats["penalty"] = float(self._sum) / self._count
        extra = {f"{self.prefix}/{k}": float(v) for k, v in stats.items()}
        logs.update(extra)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step and "loss" in history[-1]:
            history[-1].update(extra)
        self._sum, self._count = 0.0, 0

    # -- the hook on the model ---------------------------------------------------------------
    def _after_forward(self, module, args, kwargs, output):
        if not (module.training and torch.is_grad_enabled()) or torch._C._current_graph_task_id() != -1:
            return None  # evaluation, prediction, or a recompute inside backward
        value = self.regulariser.penalty()  # uses and releases what this forward recorded (0 on `every`'s off steps)
        loss = output.get("loss") if isinstance(output, dict) else None
        if not isinstance(loss, torch.Tensor):
            raise RuntimeError(
                "DecorrelationCallback adds the penalty to the loss the model returns, but this training "
                "forward returned none: pass labels in the batch, and do not set compute_loss_func or "
                "label_smoothing_factor (the Trainer then computes the loss outside the model)"
            )
        self._sum = self._sum + value.detach()
        self._count += 1
        if kwargs.get("num_items_in_batch") is not None:
            # the Trainer will not divide this loss by the accumulation steps (it is normalised by the
            # token count of the whole accumulated batch) and may multiply it by the number of processes
            value = value / max(1, int(getattr(self._args, "gradient_accumulation_steps", 1)))
            if getattr(self._args, "average_tokens_across_devices", False):
                value = value / _world_size()
        output["loss"] = loss + value
        return output

    def _remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.regulariser is not None:
            self.regulariser.close()

