"""Built-in target plugins (installed as pydm.targets)."""
