"""pydm's NBD server: every pydm device served to NBD clients.

Rules of this module:

* The codec is sans-IO and decides everything about the protocol:
  ``protocol`` is its one name space over ``wire`` (numbers and structs),
  ``handshake`` (the state machine and option handlers) and
  ``transmission`` (request checks and every reply's encoder).
* The socket side moves bytes, owns threads and buffers and builds bios,
  and never packs a reply itself: ``server`` (listeners and the connection
  set), ``connection`` (one client's life and handshake), ``reader``
  (buffered receive), ``dispatch`` (requests to bios, completions to
  replies), ``outbox`` (batched sends), ``workers`` (per-connection
  threads), ``admission`` (memory bounds), ``buffers`` (payload pool),
  ``transport`` (plain and TLS bytes).
* ``exports`` describes devices as exports, through their public face only.
"""
