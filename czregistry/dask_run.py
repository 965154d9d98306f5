"""Compatibility: ``czregistry.dask_run`` is ``czregistry.run.dask_run``
(moved when packing and running became subpackages).

The old name is an alias of the same module object, so attributes, monkeypatches and ``isinstance`` agree.
"""

import sys

from .run import dask_run as _module

sys.modules[__name__] = _module
