"""Loads the XLA FFI handlers (libescoin_jax_ffi.so, built from csrc/ffi_handlers.cpp), hands
them escoin's entry table and registers them with JAX as the target ``escoin_conv2d``."""
from __future__ import annotations

import ctypes
import glob
import os
import threading

import escoin
import jax

TARGET = "escoin_conv2d"
_lock = threading.Lock()
_registered = False


def _library_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "libescoin_jax_ffi*.so")))
    if not found:
        raise escoin.EscoinError(
            f"escoin-jax's handler library is missing from {here}: install the package "
            f"(pip install --no-build-isolation adapters/jax) rather than running it in place")
    return found[0]


def _capsule_address(capsule: object) -> int:
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = (ctypes.py_object, ctypes.c_char_p)
    return int(get(capsule, b"escoin.c_api"))


def ensure_registered() -> None:
    """Registers the handlers once per process (for the CPU, and for CUDA where this jax has
    it)."""
    global _registered
    with _lock:
        if _registered:
            return
        library = ctypes.cdll.LoadLibrary(_library_path())
        library.escoin_jax_set_api.restype = ctypes.c_int
        library.escoin_jax_set_api.argtypes = (ctypes.c_void_p,)
        if library.escoin_jax_set_api(_capsule_address(escoin.c_api())) != 0:
            raise escoin.EscoinError("escoin-jax was built against a newer escoin than the one "
                                     "installed: upgrade escoin or rebuild escoin-jax")
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.EscoinConv2dCpu),
                                    platform="cpu")
        # A jax without a CUDA plugin keeps the registration for a plugin that never loads.
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.EscoinConv2dCuda),
                                    platform="CUDA")
        _registered = True
