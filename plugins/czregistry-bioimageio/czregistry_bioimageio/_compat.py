"""Running bioimageio.spec / bioimageio.core here: offline, and on the pydantic this environment has.

Why this module exists:

- **No network at run time.** bioimage.io's tools resolve remote sources and keep a download cache. The
  packages czregistry reads or writes are local files (a remote ``source`` in an rdf.yaml is refused by the
  importer before bioimageio.spec sees it), and the cache is pointed at a private temporary folder unless
  the user set ``BIOIMAGEIO_CACHE_PATH``, so nothing is fetched or left in the home folder.
- **pydantic 2.14.** bioimageio.core 0.11.0 pins bioimageio.spec 0.5.12.0 exactly, whose three wrap
  serializers call ``handler(value, info)``; pydantic 2.14 reads the second argument as an index key and
  raises ``TypeError`` on every model description. bioimageio.spec 0.5.14 calls ``handler(value)``. Until a
  bioimageio.core release accepts that spec, ``ensure_ready`` rewrites those three functions the same way
  (their code objects, in this process only; a no-op on a spec that is already fixed).
- ``main`` is bioimageio.core's own CLI (``bioimageio test model.zip``) with the same two fixes:
  ``python -m czregistry_bioimageio.bioimageio_cli test model.zip``.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import tempfile
import textwrap
from typing import Any

__all__ = ["ensure_ready"]

_HANDLER_CALL = re.compile(r"handler\(\s*(\w+),\s*info,[^\n]*\n\s*\)")


def _fix_wrap_serializer(func: Any) -> bool:
    """Recompile ``func`` with ``handler(x, info)`` as ``handler(x)``; False when there is nothing to fix."""
    src = textwrap.dedent(inspect.getsource(func))
    fixed = _HANDLER_CALL.sub(r"handler(\1)", src)
    if fixed == src:
        return False
    lines = fixed.splitlines()
    while lines and lines[0].lstrip().startswith("@"):
        lines.pop(0)
    namespace: dict[str, Any] = {}
    exec(compile("\n".join(lines), inspect.getsourcefile(func) or "<bioimageio>", "exec"),
         func.__globals__, namespace)
    func.__code__ = namespace[func.__name__].__code__
    return True


@functools.cache
def ensure_ready() -> None:
    """Set the offline cache and fix the serializers; call before any bioimageio import does real work."""
    if "BIOIMAGEIO_CACHE_PATH" not in os.environ:
        os.environ["BIOIMAGEIO_CACHE_PATH"] = tempfile.mkdtemp(prefix="czreg-bioimageio-")
    os.environ.setdefault("BIOIMAGEIO_LOG_WARNINGS", "false")
    from bioimageio.spec._internal import io_packaging
    from bioimageio.spec._internal import validated_string_with_inner_node as inner
    from bioimageio.spec.model import v0_4

    serialize = inner.ValidatedStringWithInnerNode.__dict__["_serialize"]
    for func in (io_packaging.package_file_descr_serializer, v0_4.package_weights,
                 getattr(serialize, "wrapped", serialize)):
        _fix_wrap_serializer(func)
