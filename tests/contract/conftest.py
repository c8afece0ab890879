"""Fixtures of the contract suite: every test runs once per case of
``contract_cases.CASES``."""

import pytest

from contract_cases import CASES, new_control


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request):
    return request.param


@pytest.fixture
def control():
    c = new_control()
    yield c
    c.shutdown()
    assert c.stores.open_count() == 0 and c.claims.count() == 0
