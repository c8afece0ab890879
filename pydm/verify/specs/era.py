"""Monitors of the era target (filled in by the era models)."""

SPECS = ()
