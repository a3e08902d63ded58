"""Training-framework integrations (optional extras; nothing here is imported by ``import topodecorr``).

* :mod:`topodecorr.integrations.lightning`: ``DecorrelationCallback`` for
  ``lightning.pytorch.Trainer`` (extra ``lightning``);
* :mod:`topodecorr.integrations.transformers`: ``DecorrelationCallback`` for
  ``transformers.Trainer`` (extra ``models``).

Import the submodule you need; each raises an ``ImportError`` naming the extra
when its framework is missing.
"""
