"""Sans-IO NBD codec: fixed-newstyle handshake, request checks, reply encoding.

This module is the codec's one name space (``from pydm.nbd import protocol
as P``, then ``P.NAME``) over its three parts:

* ``wire``: magic numbers, flags, option and command numbers, NBD error
  values, limits, the structs every message is packed with, and
  ``ProtocolError``;
* ``handshake``: ``ExportInfo``, ``Session``, the handshake states and
  ``TRANSITIONS``, ``ServerHandshake`` and its option handlers;
* ``transmission``: ``check_request`` and its verdicts, every reply's
  encoder, ``find_holes``, block-status chunks and ``clip_extents``.

Rules of this module:

* It holds no code of its own: it re-exports every public name of the three
  parts.  A name two parts define differently is an ``ImportError`` here, so
  ``P.NAME`` always means one thing.
* The codec's rules hold in every part: no sockets, threads, locks or
  devices.  Bytes come in, bytes (and small result objects) go out; the
  socket layer (``connection.py``, ``dispatch.py``) decides when to read
  and where to write.  Everything in the codec can be driven by a unit test.
* ``ProtocolError`` means "hard disconnect" (the spec's MUST violations).
  Anything the client can recover from is an error *reply*, never an
  exception.

The wire format is the NBD protocol document (doc/proto.md of the
NetworkBlockDevice/nbd project); references in the parts name its sections.
"""

import types

from pydm.nbd import handshake, transmission, wire


def _public(*parts) -> dict:
    names = {}
    for part in parts:
        for name, value in vars(part).items():
            if name.startswith("_") or isinstance(value, types.ModuleType):
                continue
            if names.setdefault(name, value) is not value:
                raise ImportError(f"pydm.nbd.protocol: {name} means two things "
                                  f"(one of them in {part.__name__})")
    return names


_names = _public(wire, handshake, transmission)
globals().update(_names)
__all__ = sorted(_names)
