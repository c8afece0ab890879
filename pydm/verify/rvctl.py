"""The daemon's ``rv_*`` control commands (the kernel's tracefs rv files).

Rules of this module: each handler maps one request onto the Session and
returns plain JSON; a bad monitor or reactor name is a ``PydmError`` (one
line for the user, exit 1), never a traceback.  Handlers never touch a
device: the session is independent of the control plane's locks.
"""

from pydm.errors import PydmError
from pydm.verify.session import RVError


def _names(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise PydmError("no monitor named")
    return names


def _guard(fn):
    def handler(_control, args):
        try:
            return fn(args)
        except RVError as e:
            raise PydmError(str(e)) from None
    return handler


def handlers(session):
    def rv_list(_a):
        return [{"name": r["name"], "enabled": r["enabled"], "scope": r["scope"],
                 "description": r["description"]} for r in session.status()]

    def rv_enable(a):
        return session.enable(_names(a["monitor"]), a.get("reactor") or "record")

    def rv_disable(a):
        return session.disable(_names(a["monitor"]))

    def rv_reactor(a):
        for n in _names(a["monitor"]):
            session.set_reactor(n, a["reactor"])
        return None

    def rv_status(a):
        rows = session.status()
        if a.get("monitor"):
            want = set(session.names(_names(a["monitor"])))
            rows = [r for r in rows if r["name"] in want]
        return rows

    def rv_check(_a):
        return [str(v) for v in session.end_check()]

    table = {"rv_list": rv_list, "rv_enable": rv_enable, "rv_disable": rv_disable,
             "rv_reactor": rv_reactor, "rv_status": rv_status, "rv_check": rv_check}
    return {op: _guard(fn) for op, fn in table.items()}
