"""Every named mutant, by name (see mutant_support)."""

from mutants_core import MUTANTS as CORE
from mutants_era import MUTANTS as ERA
from mutants_wb import MUTANTS as WB

MUTANTS = {m.name: m for m in (*CORE, *ERA, *WB)}
