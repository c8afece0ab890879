"""Apply the mutant named by PYDM_MUTANT (tools/mutants) to every test here."""

import pytest

from mutant_support import active_name
from mutants import MUTANTS


@pytest.fixture(autouse=True)
def _mutant(monkeypatch):
    name = active_name()
    if name is not None:
        MUTANTS[name].apply(monkeypatch)
    yield
