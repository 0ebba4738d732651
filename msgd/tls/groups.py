"""Restrict the TLS key-exchange groups of msgd's contexts to X25519, P-256 and P-384.

Mozilla's "modern" profile allows only these three groups; OpenSSL by default also offers
X448 and P-521 (and, in 3.x, the ffdhe groups), and Python's ssl module before 3.15 has no
SSLContext.set_groups. So restrict_groups() sets the list on the SSL_CTX of the very context
it is given: through SSLContext.set_groups when Python has it, otherwise by calling
SSL_CTX_set1_groups_list (the macro SSL_CTX_ctrl(ctx, SSL_CTRL_SET_GROUPS_LIST, 0, list)) with
ctypes in the libssl that Python's _ssl module itself is linked against.

Why not an OpenSSL configuration file (OPENSSL_CONF with an ssl_conf / system_default
"Groups" line)? It is process-wide, must be in the environment before libssl initialises,
replaces the distribution's openssl.cnf, is silently ignored by OpenSSL when the file is
missing or unreadable, and nothing in Python can read the result back: a slip would leave the
default groups on without a word. The ctypes route touches only msgd's own two contexts and
every precondition is checked at run time before the call (CPython, the PySSLContext layout
"PyObject_HEAD; SSL_CTX *ctx; ..." unchanged since Python 2.7, the symbols resolved through
_ssl's own handle, the library's version equal to ssl.OPENSSL_VERSION_NUMBER, and the pointer
proven to be this context's SSL_CTX by flipping an option bit through Python and reading it
back through OpenSSL); the call's return value must be 1. Any failure raises TLSSetupError, so
msgd refuses to start rather than offer groups it must not.
"""

from __future__ import annotations

import ctypes
import re
import ssl
import sys
from collections.abc import Sequence
from typing import Any

from msgd.errors import TLSSetupError

__all__ = ["ALLOWED_GROUPS", "restrict_groups", "set_groups"]

# Preference order: X25519 first (what clients send a key share for by default).
ALLOWED_GROUPS: tuple[str, ...] = ("X25519", "P-256", "P-384")

_SSL_CTRL_SET_GROUPS_LIST = 92  # openssl/ssl.h; same value in OpenSSL 1.1.1 and 3.x
_GROUP_NAME = re.compile(r"[A-Za-z0-9_-]+")
# A harmless bit to flip for the pointer check; it is restored at once.
_PROBE_OPTION = ssl.OP_CIPHER_SERVER_PREFERENCE


def restrict_groups(ctx: ssl.SSLContext) -> None:
    """Offer only X25519, P-256 and P-384 on `ctx`; TLSSetupError when that cannot be done."""
    set_groups(ctx, ALLOWED_GROUPS)


def set_groups(ctx: ssl.SSLContext, groups: Sequence[str]) -> None:
    """Set the key-exchange groups of `ctx` to `groups` (OpenSSL names, preference order).

    Raises TLSSetupError when the groups cannot be set; never leaves the defaults silently.
    """
    if not groups or not all(_GROUP_NAME.fullmatch(g) for g in groups):
        raise TLSSetupError(f"TLS groups: not a list of group names: {list(groups)!r}")
    group_list = ":".join(groups)
    native = getattr(ctx, "set_groups", None)
    if callable(native):  # Python 3.15+
        try:
            native(group_list)
        except (ssl.SSLError, ValueError) as exc:
            raise TLSSetupError(f"TLS groups {group_list}: refused by OpenSSL ({exc})") from None
        return
    lib = _libssl()
    ptr = _ssl_ctx_pointer(ctx, lib)
    result = lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_GROUPS_LIST, 0, group_list.encode("ascii"))
    if result != 1:
        reason = _pop_openssl_error(lib)
        raise TLSSetupError(
            f"TLS groups {group_list}: SSL_CTX_set1_groups_list returned {result} ({reason}); "
            "msgd will not offer OpenSSL's default groups"
        )


# -- helpers ------------------------------------------------------------------------------

_lib: Any = None


def _libssl() -> Any:
    """The libssl (and libcrypto) that Python's _ssl module uses, with the prototypes we call.

    dlopen() of the already loaded _ssl extension returns its handle, and dlsym() on that
    handle searches _ssl and the libraries it was linked against: the very libssl whose
    SSL_CTX objects the ssl module creates, whatever other copies the system holds.
    """
    global _lib
    if _lib is not None:
        return _lib
    if sys.implementation.name != "cpython":
        raise TLSSetupError(
            f"TLS groups: cannot restrict them on {sys.implementation.name} (needs CPython)"
        )
    import _ssl

    path = getattr(_ssl, "__file__", None)
    try:
        # _ssl built into the interpreter: its libssl is in the process's global namespace.
        lib = ctypes.CDLL(path) if path else ctypes.CDLL(None)
        version = lib.OpenSSL_version_num
        version.argtypes = []
        version.restype = ctypes.c_ulong
        ctrl = lib.SSL_CTX_ctrl
        ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
        ctrl.restype = ctypes.c_long
        get_options = lib.SSL_CTX_get_options
        get_options.argtypes = [ctypes.c_void_p]
        # uint64_t since OpenSSL 3.0, unsigned long before.
        get_options.restype = (
            ctypes.c_uint64 if ssl.OPENSSL_VERSION_INFO >= (3,) else ctypes.c_ulong
        )
        lib.ERR_get_error.argtypes = []
        lib.ERR_get_error.restype = ctypes.c_ulong
        lib.ERR_error_string_n.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t]
        lib.ERR_error_string_n.restype = None
        lib.ERR_clear_error.argtypes = []
        lib.ERR_clear_error.restype = None
    except (OSError, AttributeError) as exc:
        raise TLSSetupError(
            f"TLS groups: cannot reach the OpenSSL functions of Python's _ssl module "
            f"({path or 'built in'}): {exc}"
        ) from None
    found = version()
    if found != ssl.OPENSSL_VERSION_NUMBER:
        raise TLSSetupError(
            f"TLS groups: the OpenSSL reached through {path} is version {found:#x}, but the "
            f"ssl module reports {ssl.OPENSSL_VERSION_NUMBER:#x} ({ssl.OPENSSL_VERSION})"
        )
    _lib = lib
    return lib


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib: Any) -> int:
    """The SSL_CTX* of `ctx`, proven to be that context's before it is returned."""
    ptr = _read_ctx_field(ctx)
    if not ptr:
        raise TLSSetupError("TLS groups: the SSLContext has no SSL_CTX")
    # Flip one option bit through Python and read it back through OpenSSL, both ways: only
    # this context's SSL_CTX follows (a look-alike context with equal options would not).
    original = ctx.options
    try:
        seen = [lib.SSL_CTX_get_options(ptr) == int(original)]
        ctx.options = original ^ _PROBE_OPTION
        seen.append(lib.SSL_CTX_get_options(ptr) == int(ctx.options))
    finally:
        ctx.options = original
    seen.append(lib.SSL_CTX_get_options(ptr) == int(original))
    if not all(seen):
        raise TLSSetupError(
            "TLS groups: the SSL_CTX found in the SSLContext does not follow its options "
            "(unexpected CPython layout); refusing to call OpenSSL on it"
        )
    return ptr


def _read_ctx_field(ctx: ssl.SSLContext) -> int | None:
    """The `SSL_CTX *ctx` field of the PySSLContext behind `ctx` (not yet trusted)."""
    import _ssl

    if not isinstance(ctx, _ssl._SSLContext):
        raise TLSSetupError(f"TLS groups: {type(ctx).__name__} is not an ssl.SSLContext")
    # PySSLContext starts with PyObject_HEAD then SSL_CTX *ctx; object.__basicsize__ is the
    # size of that header in this build (it is larger in a Py_TRACE_REFS build).
    offset = object.__basicsize__
    if _ssl._SSLContext.__basicsize__ < offset + ctypes.sizeof(ctypes.c_void_p):
        raise TLSSetupError("TLS groups: unexpected _ssl._SSLContext layout")
    return ctypes.c_void_p.from_address(id(ctx) + offset).value


def _pop_openssl_error(lib: Any) -> str:
    """The first queued OpenSSL error as text; the queue is cleared (Python's ssl reads it)."""
    code = lib.ERR_get_error()
    buf = ctypes.create_string_buffer(256)
    if code:
        lib.ERR_error_string_n(code, buf, len(buf))
    lib.ERR_clear_error()
    return buf.value.decode("ascii", "replace") if code else "no OpenSSL error queued"
