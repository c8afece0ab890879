"""Reference fixtures and the real thin-provisioning-tools, for the metadata tests."""

import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# Made by the real thin-provisioning-tools 0.9.0; see the README beside them.
FIXTURES = os.path.normpath(os.path.join(HERE, "..", "fixtures", "era"))
NAMES = ["fresh64", "small64", "multi1000", "wstree210", "snap64"]
SINCE = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 100, 200, 211]


def fixture_path(name, file):
    return os.path.join(FIXTURES, name, file)


def real_tool(name):
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}")
                                  else None)
    if path is None:
        pytest.fail(f"{name} (thin-provisioning-tools) is not installed; tools/install-deps.sh "
                    f"installs it")
    return path


def era_check_real(path):
    r = subprocess.run([real_tool("era_check"), path], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr
