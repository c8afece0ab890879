"""pydm's NBD server: every pydm device served to NBD clients.

``protocol`` is the sans-IO codec (handshake state machine, request checks,
reply encoding), ``exports`` describes devices as exports, ``transport`` is
plain and TLS byte transports, ``server`` the listener and connections.
"""
