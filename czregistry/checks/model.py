"""Model checks: run the model and compare it with its metadata (filled in by the model-checks issue)."""

from __future__ import annotations

CHECKS: list[object] = []
