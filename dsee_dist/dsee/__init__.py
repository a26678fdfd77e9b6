"""DSEE layers, sparse-support selection and injection."""

from .inject import TargetSpec, find_targets, inject_dsee, mark_only_adapters_trainable
from .layer import DSEELayer
from .support import select_support

__all__ = ["DSEELayer", "TargetSpec", "find_targets", "inject_dsee", "mark_only_adapters_trainable", "select_support"]
