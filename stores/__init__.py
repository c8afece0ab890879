"""Store plugins, installed as pydm.stores."""
