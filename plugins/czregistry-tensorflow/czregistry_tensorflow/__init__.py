"""Placeholder: filled in by the plugins issue."""
