"""`pydm era` commands (placeholder until implemented)."""


def register(sub):
    p = sub.add_parser("era", help="era commands (not yet implemented)")
    p.set_defaults(func=lambda args: p.error("not implemented yet"))
