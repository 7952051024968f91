"""nftables in-process: a ctypes binding of libnftables (the library behind ``nft``), no subprocess.

One :meth:`Nft.run` call is one atomic transaction of the kernel (a batch): either every command of the script
applies or none does. A small script costs ~0.1-0.5 ms, cheap enough for the claim of a warm sandbox.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

from branchbox.errors import NetworkError

_LIB_NAMES = ("libnftables.so.1", "libnftables.so")
_NFT_CTX_DEFAULT = 0


def _load() -> ctypes.CDLL:
    names = list(_LIB_NAMES)
    found = ctypes.util.find_library("nftables")
    if found:
        names.insert(0, found)
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        return lib
    raise NetworkError("libnftables is not installed: apt-get install nftables (it ships libnftables1)")


class Nft:
    """One libnftables context; calls are serialised (the context's buffers are not thread-safe)."""

    def __init__(self) -> None:
        self._lib = _load()
        ctx = self._lib.nft_ctx_new(_NFT_CTX_DEFAULT)
        if not ctx:
            raise NetworkError("nft_ctx_new failed")
        self._ctx: int | None = ctx
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)
        self._lock = threading.Lock()

    def run(self, script: str) -> str:
        """Run ``script`` (nft syntax, many commands) as one transaction; return its output."""
        with self._lock:
            if self._ctx is None:
                raise NetworkError("nftables context is closed")
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NetworkError(f"nftables rejected the rules: {err.strip() or 'unknown error'}", script=script[:2000])
        return out

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None
