"""Log the regulariser's step statistics without a training framework.

:class:`StatsLogger` sends the statistics of :class:`topodecorr.Decorrelation`'s
regularised steps — the weighted penalty, the number of neurons, the dead
neurons, the minimum / mean / maximum MST death — every ``every`` steps to

* a ``torch.utils.tensorboard.SummaryWriter`` (anything with ``add_scalar``):
  one scalar per statistic under ``PREFIX/NAME`` and a histogram of the
  step's deaths under ``PREFIX/deaths``; or
* any callable ``sink(step, stats)`` with ``stats`` a dict of Python numbers.

Pass it as ``Decorrelation(model, ..., log=StatsLogger(writer, every=50))``
(a bare writer or callable is wrapped with ``every=1``), or call it yourself
after :meth:`~topodecorr.Decorrelation.penalty`. Steps that are not logged
cost nothing; a logged step reads its statistics with one host
synchronisation. Nothing here imports tensorboard: the writer is yours.

Examples
--------
>>> import torch
>>> from torch import nn
>>> import topodecorr as td
>>> seen = []
>>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
>>> reg = td.Decorrelation(model, penalty="t1", weight=1e-3)
>>> log = StatsLogger(lambda step, stats: seen.append((step, stats)), every=2)
>>> with reg:
...     for _ in range(3):
...         loss = model(torch.randn(32, 8)).square().mean()
...         p = reg.penalty()
...         _ = log(reg, p)
...         (loss + p).backward()
>>> [step for step, _ in seen], sorted(seen[0][1])
([0, 2], ['dead', 'max_death', 'mean_death', 'min_death', 'neurons', 'penalty', 'skipped'])
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["StatsLogger", "step_statistics", "as_logger", "death_summary"]


def death_summary(deaths) -> dict[str, float | None]:
    """``min_death``, ``mean_death``, ``max_death`` of some MST deaths as Python floats (None without deaths).

    The one summary of deaths the regulariser's statistics, the inspector and the
    harness's probe report. ``deaths``: a tensor, an array, a sequence or None.

    >>> death_summary(torch.tensor([0.25, 0.5, 0.75]))
    {'min_death': 0.25, 'mean_death': 0.5, 'max_death': 0.75}
    >>> death_summary(None)
    {'min_death': None, 'mean_death': None, 'max_death': None}
    """
    if deaths is None:
        d = torch.zeros(0)
    else:
        d = deaths.detach() if isinstance(deaths, torch.Tensor) else torch.as_tensor(deaths)
    if d.numel() == 0:
        return {"min_death": None, "mean_death": None, "max_death": None}
    d = d.to(torch.float64).flatten()
    lo, mean, hi = torch.stack([d.min(), d.mean(), d.max()]).tolist()  # one host synchronisation
    return {"min_death": lo, "mean_death": mean, "max_death": hi}


def step_statistics(reg, penalty: torch.Tensor | float | None = None) -> dict[str, float] | None:
    """The last regularised step's statistics as a dict of Python numbers (None before any step).

    :meth:`topodecorr.capture.StepStats.as_dict` of ``reg.last_stats``; ``penalty`` (the weighted
    value :meth:`~topodecorr.Decorrelation.penalty` returned, e.g. rescaled) replaces the recorded
    one when given; ``min/mean/max_death`` only for penalties that build a tree.
    """
    stats = reg.last_stats
    if stats is None:
        return None
    out = stats.as_dict()
    if penalty is not None:
        out["penalty"] = float(penalty.detach()) if isinstance(penalty, torch.Tensor) else float(penalty)
    return out


class StatsLogger:
    """Send a Decorrelation's step statistics to a SummaryWriter or a callable every k steps.

    Parameters
    ----------
    sink : SummaryWriter-like or callable
        An object with ``add_scalar(tag, value, step)`` (and optionally
        ``add_histogram(tag, values, step)``), or a callable ``sink(step, stats)``.
    every : int
        Log on the first regularised step and then every ``every`` regularised steps.
    prefix : str
        Tag prefix for a writer (``"decorrelation/penalty"``, ...).
    histogram : bool
        Also write the step's MST deaths as a histogram (writers only).
    """

    def __init__(self, sink: Any, every: int = 1, prefix: str = "decorrelation", histogram: bool = True):
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self._writer = hasattr(sink, "add_scalar")
        if not self._writer and not callable(sink):
            raise TypeError(
                "sink must be a SummaryWriter (anything with add_scalar) or a callable sink(step, stats); "
                f"got {type(sink).__name__}"
            )
        self.sink = sink
        self.every = every
        self.prefix = prefix.rstrip("/")
        self.histogram = histogram
        self.calls = 0

    def __call__(self, reg, penalty: torch.Tensor | float | None = None) -> dict[str, float] | None:
        """Log the last step of ``reg`` if it is due; returns what was logged (or None)."""
        due = self.calls % self.every == 0
        self.calls += 1
        if not due:
            return None
        stats = step_statistics(reg, penalty)
        if stats is None:
            return None
        step = reg.last_stats.step
        if self._writer:
            for key, value in stats.items():
                self.sink.add_scalar(f"{self.prefix}/{key}", value, step)
            deaths = reg.last_deaths
            if self.histogram and deaths is not None and deaths.numel() > 0 and hasattr(self.sink, "add_histogram"):
                self.sink.add_histogram(f"{self.prefix}/deaths", deaths.detach().float().cpu(), step)
        else:
            self.sink(step, stats)
        return stats


def as_logger(log: Any) -> Callable | None:
    """``None``, a :class:`StatsLogger`, or a writer / callable wrapped as ``StatsLogger(log)``."""
    if log is None or isinstance(log, StatsLogger):
        return log
    return StatsLogger(log)
