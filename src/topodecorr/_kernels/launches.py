"""Count the operations and host synchronisations a function issues: a CPU-measurable launch proxy.

On an accelerator every non-view operation is (at least) one kernel launch of
5-10 µs, and every read of a device value on the host stalls the stream and
stops CUDA graphs from capturing the step. Both are properties of the code
path, not of the machine or its load, so they can be counted on CPU tensors
with the torch profiler:

* ``ops``: every aten operation the dispatcher sees, at every nesting level,
  except views (``view``, ``reshape``, ``unsqueeze``, ``as_strided`` ...: an
  operator whose schema returns an alias of an input without writing it) and
  in-place restriding (``squeeze_``, ``as_strided_`` ...). ``to`` and
  ``contiguous`` count as views: when they copy, the copy below them is
  counted. Allocations (``empty``) and copies are counted, so this is an
  upper bound on the launches.
* ``top``: the same, top-level calls only (what the Python code issues).
* ``syncs``: operators that read data on the host or size their output by the
  data: ``_local_scalar_dense`` (``.item()``, ``bool(t)``, ``float(t)``),
  ``nonzero``, ``masked_select``, ``unique`` and friends, ``equal``.
  ``.tolist()`` and ``.numpy()`` of a CPU tensor read memory without the
  dispatcher and are not seen here: run the function on ``meta`` or fake
  tensors for those (any data read raises there).
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["OpCount", "count_ops"]

_RESTRIDE = {  # views whose schema does not say so, and in-place restriding
    "_unsafe_view",
    "as_strided_",
    "squeeze_",
    "unsqueeze_",
    "transpose_",
    "t_",
    "swapdims_",
    "swapaxes_",
    "detach_",
}
SYNC_OPS = {
    "_local_scalar_dense",
    "item",
    "is_nonzero",
    "nonzero",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "equal",
}


def _is_tensor_type(t) -> bool:
    return isinstance(t, torch.TensorType) or (isinstance(t, torch.ListType) and _is_tensor_type(t.getElementType()))


@functools.lru_cache(maxsize=None)
def is_view(name: str) -> bool:
    """Whether aten operator ``name`` (without the ``aten::`` prefix) only makes a view or restrides."""
    if name in _RESTRIDE:
        return True
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return False
    schemas = [getattr(packet, o)._schema for o in packet.overloads()]
    # the overloads returning tensors or lists of them (``slice.str`` returns a string)
    schemas = [s for s in schemas if s.returns and all(_is_tensor_type(r.type) for r in s.returns)]
    if not schemas:
        return False
    return all(r.alias_info is not None and not r.alias_info.is_write for s in schemas for r in s.returns)


def _inside_sync(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::") and parent.name[len("aten::") :] in SYNC_OPS:
            return True
        parent = parent.cpu_parent
    return False


@dataclass
class OpCount:
    ops: int  # non-view aten operations, all levels
    top: int  # non-view aten operations issued at top level
    syncs: int  # host reads of device data the dispatcher sees
    by_name: dict = field(default_factory=dict)  # non-view operations per name (all levels)

    def as_dict(self) -> dict:
        return {"ops": self.ops, "top": self.top, "syncs": self.syncs}


def count_ops(fn: Callable[[], object], warmup: bool = True) -> OpCount:
    """Profile one call of ``fn`` (after one warm-up call unless ``warmup=False``) and count its operations.

    >>> x = torch.ones(4)
    >>> c = count_ops(lambda: (x * x).sum().item())  # mul, sum (and its fill_), one host read
    >>> c.ops, c.syncs, c.by_name["mul"]
    (5, 1, 1)
    """
    from torch.profiler import ProfilerActivity, profile

    if warmup:
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    names = collections.Counter()
    top = syncs = 0
    for e in events:
        name = e.name[len("aten::") :]
        if name in SYNC_OPS and not _inside_sync(e):  # ``item`` calls ``_local_scalar_dense``: one sync
            syncs += 1
        if is_view(name):
            continue
        names[name] += 1
        parent = e.cpu_parent
        if parent is None or not parent.name.startswith("aten::"):
            top += 1
    return OpCount(sum(names.values()), top, syncs, dict(names.most_common()))
