"""Compatibility: ``czregistry.checks.probing`` is ``czregistry.probing`` (the probe engine serves the checks,
packing, the runner and the smoke test, so it moved beside them rather than under ``checks``).

The old name is an alias of the same module object, so attributes and monkeypatches agree.
"""

import sys

from .. import probing as _module

sys.modules[__name__] = _module
