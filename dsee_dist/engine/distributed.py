"""The engine interface (see `dsee_dist/engine/__init__.py`) under its earlier module name, so that
`from dsee_dist.engine import distributed; distributed.barrier()` keeps working."""

from dsee_dist.engine import *  # noqa: F403
from dsee_dist.engine import __all__  # noqa: F401
