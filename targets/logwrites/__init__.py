"""log-writes: every write logged in the order it became durable (see target.py)."""

from pydm.targets.logwrites.target import LogWritesTarget

TARGET = LogWritesTarget
