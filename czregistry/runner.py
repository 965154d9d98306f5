"""Compatibility: ``czregistry.runner`` is ``czregistry.run.runner``
(moved when packing and running became subpackages).

The old name is an alias of the same module object, so attributes, monkeypatches and ``isinstance`` agree.
"""

import sys

from .run import runner as _module

sys.modules[__name__] = _module
