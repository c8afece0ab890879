"""Runtime verification: trace events checked against automata (kernel RV style)."""
