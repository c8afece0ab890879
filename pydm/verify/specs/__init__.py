"""The monitors pydm ships: one Spec per .dot model (see docs/rv/).

Rules of this package: a spec module only reads trace events (it imports no
target or core module), so any layer may emit what a monitor needs and the
monitors stay testable with hand-written event sequences.
"""

from pydm.verify.specs import core, era, writeboost

SPECS = {s.name: s for s in (*core.SPECS, *era.SPECS, *writeboost.SPECS)}
