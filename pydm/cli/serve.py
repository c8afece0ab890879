"""`pydm serve` commands (placeholder until implemented)."""


def register(sub):
    p = sub.add_parser("serve", help="serve commands (not yet implemented)")
    p.set_defaults(func=lambda args: p.error("not implemented yet"))
