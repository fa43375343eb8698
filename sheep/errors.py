"""The one table of result codes, and one exception class per code.

The daemon answers every failed request with a code from this table; the client
raises the matching exception; dog prints its message and exits with its exit
code. Tests check the mapping is a bijection.
"""

from __future__ import annotations

import enum

# dog's exit codes, as in Sheepdog.
EXIT_SUCCESS = 0
EXIT_FAILURE = 1
EXIT_SYSTEM = 2
EXIT_EXISTS = 3
EXIT_FULL = 4
EXIT_MISSING = 5
EXIT_PERMISSION = 77  # sysexits' EX_NOPERM: not authenticated, or not allowed
EXIT_USAGE = 64


class Result(enum.IntEnum):
    SUCCESS = 0
    UNKNOWN = 1
    INVALID_PARMS = 2
    NO_OBJ = 3
    EIO = 4
    NO_SPACE = 5
    OLD_NODE_VER = 6  # the request's epoch is older than the receiver's
    NEW_NODE_VER = 7  # the request's epoch is newer than the receiver's
    NOT_FORMATTED = 8
    ALREADY_FORMATTED = 9
    EXISTS = 10
    NO_VDI = 11
    NO_TAG = 12
    VDI_LOCKED = 13
    READ_ONLY = 14
    SHUTDOWN = 15
    UNAVAILABLE = 16  # the node cannot serve now (joining, fenced): retry elsewhere
    BAD_REQUEST = 17  # a malformed frame
    UNKNOWN_OP = 18
    NETWORK = 19  # a peer could not be reached
    TIMEOUT = 20
    TOO_FEW_ZONES = 21
    SYSTEM = 22
    UNVERIFIED = 23  # this copy may be stale (its node was away): read another
    PERMISSION_DENIED = 24  # the caller's principal may not do this (see proto.Caller, auth.Caps)
    AUTH_FAILED = 25  # the connection did not authenticate (no handshake, wrong key)


class SheepError(Exception):
    """Base of every error the system reports by result code."""

    result: Result = Result.UNKNOWN
    exit_code: int = EXIT_FAILURE
    default_message = "unknown error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)

    @property
    def message(self) -> str:
        return str(self.args[0])


def _define(name: str, result: Result, exit_code: int, message: str) -> type[SheepError]:
    cls = type(name, (SheepError,), {
        "result": result, "exit_code": exit_code, "default_message": message,
    })
    return cls


UnknownError = _define("UnknownError", Result.UNKNOWN, EXIT_FAILURE, "unknown error")
InvalidParameters = _define(
    "InvalidParameters", Result.INVALID_PARMS, EXIT_USAGE, "invalid parameters")
NoObject = _define("NoObject", Result.NO_OBJ, EXIT_MISSING, "no such object")
IOErrorResult = _define("IOErrorResult", Result.EIO, EXIT_SYSTEM, "I/O error")
NoSpace = _define("NoSpace", Result.NO_SPACE, EXIT_FULL, "no space left on the store")
OldNodeVersion = _define(
    "OldNodeVersion", Result.OLD_NODE_VER, EXIT_FAILURE, "request epoch is older than the node's")
NewNodeVersion = _define(
    "NewNodeVersion", Result.NEW_NODE_VER, EXIT_FAILURE, "request epoch is newer than the node's")
NotFormatted = _define(
    "NotFormatted", Result.NOT_FORMATTED, EXIT_FAILURE,
    "the cluster is not formatted (run 'dog cluster format')")
AlreadyFormatted = _define(
    "AlreadyFormatted", Result.ALREADY_FORMATTED, EXIT_EXISTS, "the cluster is already formatted")
Exists = _define("Exists", Result.EXISTS, EXIT_EXISTS, "already exists")
NoVdi = _define("NoVdi", Result.NO_VDI, EXIT_MISSING, "no such VDI")
NoTag = _define("NoTag", Result.NO_TAG, EXIT_MISSING, "no such snapshot")
VdiLocked = _define("VdiLocked", Result.VDI_LOCKED, EXIT_FAILURE, "the VDI is locked")
ReadOnly = _define("ReadOnly", Result.READ_ONLY, EXIT_FAILURE, "read-only")
ShuttingDown = _define("ShuttingDown", Result.SHUTDOWN, EXIT_FAILURE, "the node is shutting down")
Unavailable = _define(
    "Unavailable", Result.UNAVAILABLE, EXIT_FAILURE, "the node cannot serve requests now")
BadRequest = _define("BadRequest", Result.BAD_REQUEST, EXIT_SYSTEM, "malformed request")
UnknownOp = _define("UnknownOp", Result.UNKNOWN_OP, EXIT_SYSTEM, "unknown operation")
NetworkError = _define("NetworkError", Result.NETWORK, EXIT_SYSTEM, "network error")
Timeout = _define("Timeout", Result.TIMEOUT, EXIT_SYSTEM, "timed out")
TooFewZones = _define(
    "TooFewZones", Result.TOO_FEW_ZONES, EXIT_FAILURE, "fewer zones than copies")
SystemFailure = _define("SystemFailure", Result.SYSTEM, EXIT_SYSTEM, "system error")
Unverified = _define(
    "Unverified", Result.UNVERIFIED, EXIT_FAILURE, "this copy is not verified current yet")
PermissionDenied = _define(
    "PermissionDenied", Result.PERMISSION_DENIED, EXIT_PERMISSION,
    "permission denied: this connection may not send this operation")
AuthFailed = _define(
    "AuthFailed", Result.AUTH_FAILED, EXIT_PERMISSION,
    "authentication failed")

_by_result: dict[Result, type[SheepError]] = {
    cls.result: cls
    for cls in (
        UnknownError, InvalidParameters, NoObject, IOErrorResult, NoSpace, OldNodeVersion,
        NewNodeVersion, NotFormatted, AlreadyFormatted, Exists, NoVdi, NoTag, VdiLocked,
        ReadOnly, ShuttingDown, Unavailable, BadRequest, UnknownOp, NetworkError, Timeout,
        TooFewZones, SystemFailure, Unverified, PermissionDenied, AuthFailed,
    )
}
assert set(_by_result) == set(Result) - {Result.SUCCESS}, "every failure code has a class"


def error_class(result: int) -> type[SheepError]:
    """The exception class for a result code; unknown codes map to UnknownError."""
    try:
        return _by_result[Result(result)]
    except (ValueError, KeyError):
        return UnknownError


def error_for(result: int, message: str | None = None) -> SheepError:
    return error_class(result)(message)


class UsageError(SheepError):
    """Bad arguments given to dog or sheep (never sent over the wire)."""

    result = Result.INVALID_PARMS
    exit_code = EXIT_USAGE
    default_message = "usage error"

# What a fenced sheep answers: its cluster driver's session is in doubt or lost, so
# the others may move on without it (sheep/lease.py).
fenced_message = ("this sheep is fenced: its cluster driver's session is in doubt (its lease"
                  " ran out) or lost, or it is catching up with the cluster log")
