"""Persistent-data library and on-disk metadata formats (installed as pydm.metadata)."""
