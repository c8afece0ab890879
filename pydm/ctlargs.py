"""The shape of a control request, checked before any handler sees it.

Rules of this module: one table, ``ARG_TYPES``, says what type every request
argument has, for every command (an argument means the same wherever it
appears).  ``check_request`` refuses a request whose ``op`` is not a known
command, whose ``args`` is not an object, or which carries an unknown
argument or one of the wrong type, with a ``PydmError`` naming it; nothing
is coerced (``"readonly": "no"`` is an error, not ``True``).
"""

import errno
import math

from pydm.errors import PydmError

_STR, _OPT_STR, _BOOL, _UINT, _OPT_UINT, _OPT_SECONDS = (
    "a string", "a string or null", "true or false", "a non-negative integer",
    "a non-negative integer or null", "a number of seconds or null")

ARG_TYPES = {
    "name": _STR,
    "new_name": _STR,
    "text": _STR,
    "table": _OPT_STR,
    "uuid": _OPT_STR,
    "cwd": _OPT_STR,
    "target": _OPT_STR,
    "readonly": _BOOL,
    "noflush": _BOOL,
    "force": _BOOL,
    "deferred": _BOOL,
    "inactive": _BOOL,
    "sector": _UINT,
    "event_nr": _OPT_UINT,
    "timeout": _OPT_SECONDS,
    "monitor": _OPT_STR,
    "reactor": _OPT_STR,
}


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _fits(kind, v) -> bool:
    if v is None:
        return kind in (_OPT_STR, _OPT_UINT, _OPT_SECONDS)
    if kind in (_STR, _OPT_STR):
        return isinstance(v, str)
    if kind == _BOOL:
        return isinstance(v, bool)
    if kind in (_UINT, _OPT_UINT):
        return _is_uint(v)
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and v >= 0)


def check_request(req, commands):
    """(op, args) of a decoded request, or ``PydmError`` (EINVAL)."""
    if not isinstance(req, dict):
        raise PydmError("malformed request: not a JSON object")
    op = req.get("op")
    if not isinstance(op, str):
        raise PydmError("malformed request: 'op' must be a string")
    if op not in commands:
        raise PydmError(f"unknown command {op!r}")
    args = req.get("args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise PydmError("malformed request: 'args' must be an object")
    for key, value in args.items():
        kind = ARG_TYPES.get(key)
        if kind is None:
            raise PydmError(f"{op}: unknown argument {key!r}")
        if not _fits(kind, value):
            raise PydmError(f"{op}: argument {key!r} must be {kind}, not "
                            f"{_describe(value)}", errno.EINVAL)
    return op, args


def _describe(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
