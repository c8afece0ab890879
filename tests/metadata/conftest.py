import os

import pytest

from era_fixtures import FIXTURES


@pytest.fixture(scope="session")
def fixtures_dir():
    if not os.path.isdir(FIXTURES):
        pytest.fail(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES
