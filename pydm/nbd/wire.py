"""NBD wire format: magic numbers, flags, option and command numbers, error
values, limits and the structs every message is packed with.

Rules of this module:

* Data only: numbers, ``struct.Struct`` layouts and name tables, no logic
  beyond them.  Nothing here knows sockets, threads, locks or devices; the
  codec (``handshake``, ``transmission``) and the tests pack and unpack with
  these structs, so one layout has exactly one definition.
* Values are the protocol document's (doc/proto.md of the
  NetworkBlockDevice/nbd project); NBD error values come from their one home
  in ``pydm.errors``.
* ``ProtocolError`` means "hard disconnect" (the spec's MUST violations).
  Anything the client can recover from is an error *reply*, never an
  exception.
"""

import struct

from pydm import errors as _errors

# --------------------------------------------------------------- constants
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 0x1
FLAG_NO_ZEROES = 0x2
FLAG_C_FIXED_NEWSTYLE = 0x1
FLAG_C_NO_ZEROES = 0x2

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_PLATFORM = 0x80000004
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
REP_ERR_BLOCK_SIZE_REQD = 0x80000008
REP_ERR_TOO_BIG = 0x80000009

# info types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 0x0001
TF_READ_ONLY = 0x0002
TF_SEND_FLUSH = 0x0004
TF_SEND_FUA = 0x0008
TF_ROTATIONAL = 0x0010
TF_SEND_TRIM = 0x0020
TF_SEND_WRITE_ZEROES = 0x0040
TF_SEND_DF = 0x0080
TF_CAN_MULTI_CONN = 0x0100
TF_SEND_CACHE = 0x0400
TF_SEND_FAST_ZERO = 0x0800

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# command flags
CMD_FLAG_FUA = 0x01
CMD_FLAG_NO_HOLE = 0x02
CMD_FLAG_DF = 0x04
CMD_FLAG_REQ_ONE = 0x08
CMD_FLAG_FAST_ZERO = 0x10

# structured reply chunk types and flags
REPLY_FLAG_DONE = 0x1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 0x8001
REPLY_TYPE_ERROR_OFFSET = 0x8002

# NBD error values, from their one home (pydm.errors.nbd_error produces them)
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = (
    _errors.NBD_EPERM, _errors.NBD_EIO, _errors.NBD_ENOMEM, _errors.NBD_EINVAL,
    _errors.NBD_ENOSPC, _errors.NBD_EOVERFLOW, _errors.NBD_ENOTSUP, _errors.NBD_ESHUTDOWN)

# Limits.  Strings are capped by the spec; an option body is capped so a
# hostile client cannot make us buffer much before we have said a word.
MAX_STRING = 4096
MAX_OPTION_DATA = 64 << 10
MAX_META_QUERIES = 128
MAX_PAYLOAD = 32 << 20          # the largest READ/WRITE taken at all
MIN_BLOCK = 512                 # bios are sector-granular: no export goes below
MAX_EXTENTS = 1 << 16           # per block-status chunk (spec allows 2^20)
HOLE_BLOCK = 4096               # OFFSET_HOLE chunks cover whole aligned blocks
HOLE_READ_MIN = 64 << 10        # smaller reads are always one data chunk
MAX_HOLES = 64                  # hole chunks per reply (each costs two iovecs)

GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
DATA_CHUNK = struct.Struct(">IHHQIQ")      # chunk header + offset (OFFSET_DATA)
HOLE_CHUNK = struct.Struct(">IHHQIQI")
ERROR_CHUNK = struct.Struct(">IHHQIIH")    # + message
U16, U32, U64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")
EXPORT_INFO = struct.Struct(">HQH")
BLOCK_INFO = struct.Struct(">HIII")
EXTENT = struct.Struct(">II")

OPTION_NAMES = {
    OPT_EXPORT_NAME: "EXPORT_NAME", OPT_ABORT: "ABORT", OPT_LIST: "LIST",
    OPT_PEEK_EXPORT: "PEEK_EXPORT", OPT_STARTTLS: "STARTTLS", OPT_INFO: "INFO",
    OPT_GO: "GO", OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT", OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}
CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
             CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
             CMD_BLOCK_STATUS: "BLOCK_STATUS"}


class ProtocolError(Exception):
    """The client broke a MUST of the protocol: drop the connection."""
