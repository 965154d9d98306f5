"""The sharing wing: packages leave the lab and come back verified.

``signing`` (OpenSSF model-signing bundles and signed report attestations, offline, with EC keys), ``oci``
(push and pull through OCI registries, the report and signatures as referrers) and ``_smallfile`` (bounded
reads of the small foreign files both take: keys, bundles). Nothing is imported here: cryptography,
model-signing and oras-py load only when a command signs, verifies, pushes or pulls.
"""

from __future__ import annotations

__all__: list[str] = []
