"""Monitors of the writeboost target (filled in by the writeboost models)."""

SPECS = ()
