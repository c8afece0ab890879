"""Load deterministic automata from the kernel RV .dot subset.

Rules of this module: no graphviz, no I/O beyond reading the file.  The
subset is the one rvgen parses: first line ``digraph state_automaton {``; an
invisible ``__init_<state>`` node with an edge to the initial state;
``doublecircle`` (or ``ellipse``) marks final states (none given: the initial state is final);
edges ``"a" -> "b" [ label = "ev1\\nev2" ];`` with several events split on a
literal backslash-n.  Hybrid automata (the clock-guarded monitors Linux RV
added): a node label line ``clk < NAME`` is a state invariant, armed on
entry, whose threshold ``NAME`` the monitor supplies in seconds.  The model is checked for determinism and reachability.
"""

import os
import re

_NODE = re.compile(r'\{node \[([^\]]*)\]\s*"([^"]+)"\}')
_LABEL = re.compile(r'label\s*=\s*"([^"]*)"')
_INVARIANT = re.compile(r"^clk\s*<\s*([A-Za-z_][A-Za-z0-9_]*)$")
_EDGE = re.compile(r'"([^"]+)"\s*->\s*"([^"]+)"(?:\s*\[\s*label\s*=\s*"([^"]*)"\s*\])?')

MODELS_DIR = os.path.join(os.path.dirname(__file__), "models")


class ModelError(ValueError):
    pass


class Automaton:
    def __init__(self, name, states, events, initial, finals, table, invariants=None):
        self.name = name
        self.states = states
        self.events = events
        self.initial = initial
        self.finals = finals
        self.table = table          # (state, event) -> next state
        self.invariants = invariants or {}      # state -> threshold name
        self._exits = {a for (a, _e) in table}

    def has_exits(self, state):
        return state in self._exits

    def next(self, state, event):
        return self.table.get((state, event))

    def __repr__(self):
        return f"<Automaton {self.name}: {len(self.states)} states, {len(self.events)} events>"


def parse(text: str, name: str = "model") -> Automaton:
    lines = [l.strip() for l in text.strip().splitlines()]
    if not lines or lines[0] != "digraph state_automaton {":
        raise ModelError(f"{name}: first line must be 'digraph state_automaton {{'")
    states, finals, initial, invariants = [], set(), None, {}
    for attrs, node in _NODE.findall(text):
        if node.startswith("__init_"):
            continue
        states.append(node)
        label = _LABEL.search(attrs)
        for part in (label.group(1).split("\\n")[1:] if label else ()):
            m = _INVARIANT.match(part.strip())
            if not m:
                raise ModelError(f"{name}: state {node}: cannot read {part.strip()!r} "
                                 "(only 'clk < NAME' invariants)")
            invariants[node] = m.group(1)
        if "doublecircle" in attrs or "ellipse" in attrs:
            finals.add(node)
    table, events = {}, []
    for src, dst, label in _EDGE.findall(text):
        if src.startswith("__init_"):
            if initial is not None:
                raise ModelError(f"{name}: two initial states")
            initial = dst
            continue
        for ev in (label or "").split("\\n"):
            ev = ev.split(";")[0].strip()
            if not ev:
                continue
            if (src, ev) in table and table[(src, ev)] != dst:
                raise ModelError(f"{name}: not deterministic: {src} on {ev}")
            table[(src, ev)] = dst
            if ev not in events:
                events.append(ev)
    if initial is None:
        raise ModelError(f"{name}: no __init_ node")
    unknown = {s for k, d in table.items() for s in (k[0], d)} - set(states)
    if unknown:
        raise ModelError(f"{name}: undeclared states {sorted(unknown)}")
    if not finals:
        finals = {initial}
    seen, todo = {initial}, [initial]
    while todo:
        s = todo.pop()
        for (a, _e), b in table.items():
            if a == s and b not in seen:
                seen.add(b)
                todo.append(b)
    if set(states) - seen:
        raise ModelError(f"{name}: unreachable states {sorted(set(states) - seen)}")
    return Automaton(name, states, events, initial, finals, table, invariants)


def load(name: str) -> Automaton:
    path = name if os.sep in name else os.path.join(MODELS_DIR, f"{name}.dot")
    with open(path) as f:
        return parse(f.read(), os.path.splitext(os.path.basename(path))[0])
