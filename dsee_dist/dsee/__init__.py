"""DSEE layers, sparse-support selection and injection."""

from dsee_dist.dsee.inject import TargetSpec, find_targets, inject_dsee, mark_only_adapters_trainable
from dsee_dist.dsee.layer import DSEELayer
from dsee_dist.dsee.support import select_support

__all__ = ["DSEELayer", "TargetSpec", "find_targets", "inject_dsee", "mark_only_adapters_trainable", "select_support"]
