"""Compatibility: ``czregistry.packing`` is ``czregistry.pack.core``
(moved when packing and running became subpackages).

The old name is an alias of the same module object, so attributes, monkeypatches and ``isinstance`` agree.
"""

import sys

from .pack import core as _module

sys.modules[__name__] = _module
