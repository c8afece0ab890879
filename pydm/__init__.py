"""pydm: a userspace device-mapper with an NBD server."""

__version__ = "0.1.0"
