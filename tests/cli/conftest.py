"""A real ``pydm serve`` daemon in a subprocess, and a runner for ``pydm`` commands."""

import pytest

from helpers import Cli, Daemon


@pytest.fixture
def start_daemon(tmp_path):
    daemons = []

    def start(config=None, extra=(), wrapper=()):
        d = Daemon(tmp_path, config, extra, wrapper)
        daemons.append(d)
        return d
    yield start
    for d in daemons:
        assert d.stop() == 0


@pytest.fixture
def cli(tmp_path):
    return Cli(tmp_path / "ctl.sock", tmp_path)
