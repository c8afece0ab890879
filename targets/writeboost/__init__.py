"""writeboost: a log-structured write-back cache (see target.py)."""

from pydm.targets.writeboost.target import WriteboostTarget

TARGET = WriteboostTarget
