"""Shared timing helpers for the benchmark scripts (not part of the test suite).

Conventions every benchmark follows:

* Each measurement runs ``warmup`` untimed calls (JIT compilation, caches,
  allocator), then ``repeats`` timed calls; we report the **median** (robust
  to the noise of a shared machine) and keep the raw times.
* Alternatives that are compared are timed **interleaved, in one run**
  (round-robin over the candidates, see :func:`time_interleaved`), so that
  load from other processes hits all of them alike; quote ratios from one run.
* Results go to ``benchmarks/out/<name>.json`` (everything: machine info,
  settings, raw times), ``<name>.csv`` (one row per measurement) and
  ``<name>.md`` (a readable table), written by :func:`write_results`.

Typical use::

    from _timing import Timer, machine_info, write_results
    t = Timer(repeats=7, warmup=1)
    rows = [t.measure("mst", n=4096, fn=lambda: kernel(D))]
    write_results("kernel", rows, settings={...})
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable

RESULTS_DIR = Path(__file__).resolve().parent / "out"  # raw dumps, not committed (.gitignore)

__all__ = [
    "RESULTS_DIR",
    "Timer",
    "machine_info",
    "median_ms",
    "time_call",
    "time_interleaved",
    "write_results",
    "markdown_table",
]


def _sync(device: str | None) -> None:
    if device and device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], Any], repeats: int = 7, warmup: int = 1, device: str | None = None
) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    ``device="cuda..."`` synchronises the GPU before starting and after each
    call, so the times are those of the finished work. The garbage collector
    is disabled while timing (its pauses are not the code's cost).
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    finally:
        if was_enabled:
            gc.enable()
    return times


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int = 7, warmup: int = 1, device: str | None = None
) -> dict[str, list[float]]:
    """Time several callables round-robin (A B C A B C ...), seconds per call each.

    Interleaving makes the comparison fair on a machine whose load changes:
    every candidate sees the same background noise.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    out: dict[str, list[float]] = {k: [] for k in fns}
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                _sync(device)
                out[k].append(time.perf_counter() - t0)
    finally:
        if was_enabled:
            gc.enable()
    return out


def median_ms(times: Iterable[float]) -> float:
    """Median of times in seconds, in milliseconds."""
    return 1e3 * statistics.median(list(times))


class Timer:
    """Collects measurements as rows ``{"name", "median_ms", "min_ms", "times_ms", **tags}``."""

    def __init__(self, repeats: int = 7, warmup: int = 1, device: str | None = None):
        self.repeats = repeats
        self.warmup = warmup
        self.device = device

    def row(self, name: str, times: list[float], **tags: Any) -> dict[str, Any]:
        return {
            "name": name,
            **tags,
            "median_ms": median_ms(times),
            "min_ms": 1e3 * min(times),
            "repeats": len(times),
            "times_ms": [round(1e3 * t, 4) for t in times],
        }

    def measure(self, name: str, fn: Callable[[], Any], repeats: int | None = None, **tags: Any) -> dict[str, Any]:
        times = time_call(fn, repeats or self.repeats, self.warmup, self.device)
        return self.row(name, times, **tags)

    def measure_many(
        self, fns: dict[str, Callable[[], Any]], repeats: int | None = None, **tags: Any
    ) -> list[dict[str, Any]]:
        res = time_interleaved(fns, repeats or self.repeats, self.warmup, self.device)
        return [self.row(k, v, **tags) for k, v in res.items()]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, core count, load, library versions, date (UTC)."""
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    for mod in ("torch", "numpy", "numba", "scipy", "gph", "gudhi", "ripser"):
        try:
            m = __import__(mod)
            info[f"{mod}_version"] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001 - optional packages
            info[f"{mod}_version"] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        pass
    return info


def markdown_table(rows: list[dict[str, Any]], columns: list[str], floatfmt: str = "{:.3g}") -> str:
    """A GitHub-markdown table of ``rows`` restricted to ``columns`` (missing cells blank)."""

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return floatfmt.format(v)
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_results(
    name: str,
    rows: list[dict[str, Any]],
    settings: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    markdown: str | None = None,
    directory: Path | None = None,
) -> dict[str, Path]:
    """Write ``<name>.json`` (all), ``<name>.csv`` (rows, no raw times) and ``<name>.md``.

    Returns the paths written.
    """
    d = Path(directory) if directory is not None else RESULTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine_info(), "settings": settings or {}, "rows": rows, **(extra or {})}
    paths = {"json": d / f"{name}.json", "csv": d / f"{name}.csv"}
    paths["json"].write_text(json.dumps(payload, indent=1, default=str) + "\n")
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k != "times_ms" and k not in keys:
                keys.append(k)
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in keys})
    if markdown is not None:
        paths["md"] = d / f"{name}.md"
        paths["md"].write_text(markdown)
    return paths
