"""What a SparseFilter derives from its arrays and keeps: per input geometry the stretched
offsets, the CUDA kernels' programs and their device copies.

Two levels, so that filters sharing a nonzero pattern with other values
(``SparseFilter.with_values``: training, where an optimiser step changes the values and keeps the
pattern) share what the pattern alone decides:

* :class:`Pattern`: row_ptr, col_idx, shape, groups, the stretched offsets per geometry and their
  device copies, row_ptr's device copies, and the tile programs' layouts (a program with the
  words that hold its weights) where a filter of new values asked for one, on the host or, for
  values a caller keeps on a device (``SparseFilter.prepare(values=...)``), uploaded;
* :class:`CsrStore`: one filter's values (cast per dtype, copied per device) and its programs,
  over a Pattern.

Both fill their caches under a lock, so two threads may use one filter.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import numpy as np

from escoin import _core
from escoin.cuda_arrays import DeviceBuffer

# A filter keeps what it derives per input geometry (stretched offsets, device copies, kernel
# programs: ~4 to ~20 bytes a nonzero each) for as long as it lives, since every call of that
# geometry reuses it. A model fed many input sizes grows these without bound; past this many
# geometries a filter says so, once, and names SparseFilter.release_geometries.
MANY_GEOMETRIES = 16


class DevicePointers(NamedTuple):
    """Device addresses of a filter's arrays for one geometry, as :func:`escoin.sconv` takes
    them."""

    row_ptr: int       # int64, out_channels + 1
    offsets: int       # int32 stretched offsets, one per nonzero
    values: int        # float32, one per nonzero
    tile_program: int  # the staged kernel's program; 0 where that kernel would not pay


class TileLayout(NamedTuple):
    """A tile program of one pattern and geometry, and where its weights sit: the program of
    any values of that pattern is `program` with values[j] (float32) at word slots[j]."""

    program: np.ndarray  # uint8, as escoin_tile_program_build wrote it
    slots: np.ndarray    # int64, one per nonzero


class DeviceTileLayout(NamedTuple):
    """A TileLayout uploaded to one device, from which the program of values on that device is
    written there (_core.tile_program_write_weights)."""

    program: DeviceBuffer
    slots: DeviceBuffer


class Pattern:
    """A filter's nonzero pattern and what is derived from it alone (module docstring)."""

    def __init__(self, row_ptr: np.ndarray, col_idx: np.ndarray,
                 shape: Tuple[int, int, int, int], groups: int) -> None:
        # Read-only from here on: the kernels trust row_ptr[M] to be the length of the offsets
        # derived from col_idx (a larger one read past them: a crash), and the caches below
        # would not follow a changed array. A changed pattern is a new filter.
        self.row_ptr, self.col_idx = frozen(row_ptr), frozen(col_idx)
        self.shape, self.groups = shape, groups
        self.lock = threading.Lock()
        self.host_offsets: Dict[tuple, np.ndarray] = {}
        self.device_row_ptr: Dict[int, DeviceBuffer] = {}
        self.device_offsets: Dict[Tuple[int, tuple], DeviceBuffer] = {}
        # Per geometry and forced form (ESCOIN_TILE_FORM, read by the builder); None: the
        # staged kernel would not pay for that geometry, so there is no program.
        self.tile_layouts: Dict[tuple, Optional[TileLayout]] = {}
        self.device_tile_layouts: Dict[tuple, Optional[DeviceTileLayout]] = {}
        self.warned_of_geometries = False
        # Counts release_geometries calls: a prepared call (SparseFilter.prepare) holds the
        # per-geometry arrays' addresses and refuses to run once this moved on. The cell holds
        # the same count in memory, for compiled callers of a prepared call's arrays
        # (PreparedCall.native_arguments), which check it without Python.
        self.generation = 0
        self.generation_cell = np.zeros(1, np.int64)

    def offsets(self, desc: tuple) -> np.ndarray:
        key = offsets_key(desc)
        warn = False
        with self.lock:
            found = self.host_offsets.get(key)
            if found is None:
                found = np.empty(self.col_idx.size, np.int32)
                _core.stretch_offsets(desc, self.col_idx.ctypes.data, self.col_idx.size,
                                      found.ctypes.data)
                found = self.host_offsets[key] = frozen(found)
                warn = len(self.host_offsets) > MANY_GEOMETRIES and not self.warned_of_geometries
                self.warned_of_geometries |= warn
        if warn:
            # (Python's default filter shows it once per escoin call site, not once a filter)
            warnings.warn(f"an escoin filter now keeps offsets and programs for more than "
                          f"{MANY_GEOMETRIES} input geometries (one per input size it was "
                          f"called with); SparseFilter.release_geometries (escoin_torch."
                          f"release_geometries for PyTorch models) frees them",
                          RuntimeWarning, stacklevel=3)
        return found

    def device_arrays(self, device: int, desc: tuple) -> Tuple[int, int]:
        """Device addresses of row_ptr and of desc's offsets, uploaded once per device."""
        key = (device, offsets_key(desc))
        with self.lock:
            row_ptr = self.device_row_ptr.get(device)
            if row_ptr is None:
                row_ptr = self.device_row_ptr[device] = DeviceBuffer.from_host(self.row_ptr,
                                                                               device)
        offsets = built_once(self.lock, self.device_offsets, key,
                             lambda: DeviceBuffer.from_host(self.offsets(desc), device))
        return row_ptr.ptr, offsets.ptr

    def tile_layout(self, desc: tuple, values32: np.ndarray) -> Optional[TileLayout]:
        """desc's tile program layout, built once (with `values32`, any values of the pattern:
        every word but the weights depends on the pattern alone); None where the staged kernel
        would not pay."""
        def build() -> Optional[TileLayout]:
            program = self.program("tile", desc, values32)
            if program is None:
                return None
            slots = np.empty(self.col_idx.size, np.int64)
            _core.tile_program_weight_slots(desc, self.row_ptr.ctypes.data,
                                            self.offsets(desc).ctypes.data, slots.ctypes.data,
                                            slots.size)
            return TileLayout(program, slots)

        key = (offsets_key(desc), os.environ.get("ESCOIN_TILE_FORM"))
        return built_once(self.lock, self.tile_layouts, key, build)

    def device_tile_layout(self, device: int, desc: tuple,
                           values32: np.ndarray) -> Optional[DeviceTileLayout]:
        """desc's tile layout (tile_layout, `values32` as there) on `device`, uploaded once."""
        def build() -> Optional[DeviceTileLayout]:
            layout = self.tile_layout(desc, values32)
            return None if layout is None else DeviceTileLayout(
                DeviceBuffer.from_host(layout.program, device),
                DeviceBuffer.from_host(layout.slots, device))

        key = (device, offsets_key(desc), os.environ.get("ESCOIN_TILE_FORM"))
        return built_once(self.lock, self.device_tile_layouts, key, build)

    def program(self, kind: str, desc: tuple, values32: np.ndarray) -> Optional[np.ndarray]:
        """A CUDA kernel's program for desc and these float32 values (host bytes): the staged
        kernel's ("tile") or the tensor-core kernel's ("mma"); None where that kernel would not
        pay or run."""
        args = (desc, self.row_ptr.ctypes.data, self.offsets(desc).ctypes.data,
                values32.ctypes.data)
        nbytes = _core.program_size(kind, *args)
        if nbytes == 0:
            return None
        program = np.empty(nbytes, np.uint8)
        _core.program_build(kind, *args, program.ctypes.data, nbytes)
        return program

    def release_geometries(self) -> int:
        """Drops every per-geometry cache; returns the bytes they held. Device memory is freed
        by cudaFree, after the device's queued work."""
        with self.lock:
            # The generation first: compiled callers check the cell before each launch, so it
            # must have moved on before the arrays are freed.
            self.generation += 1
            self.generation_cell[0] = self.generation
            held = ([a.nbytes for a in self.host_offsets.values()]
                    + [b.nbytes for b in self.device_offsets.values()]
                    + [t.program.nbytes + t.slots.nbytes
                       for t in [*self.tile_layouts.values(), *self.device_tile_layouts.values()]
                       if t is not None])
            self.host_offsets.clear()
            self.device_offsets.clear()
            self.tile_layouts.clear()
            self.device_tile_layouts.clear()
            self.warned_of_geometries = False
        return sum(held)


class CsrStore:
    """One filter's values over a Pattern, and what is derived from both (module docstring)."""

    def __init__(self, pattern: Pattern, values: np.ndarray, derived: bool = False) -> None:
        self.pattern = pattern
        self.values = frozen(values)
        # Built by with_values: its tile programs are the pattern's layouts with its weights
        # written in (the filter the pattern came with builds its own, and no layout).
        self.derived = derived
        self.lock = threading.Lock()
        self.host_values: Dict[np.dtype, np.ndarray] = {values.dtype: self.values}
        self.device_values: Dict[int, DeviceBuffer] = {}
        # Per (kind, device, geometry): the staged kernel's ("tile") and the tensor-core
        # kernel's ("mma") programs, built when a call asks for that kernel. None: the kernel
        # would not pay for that geometry or cannot run it, so there is no program.
        self.device_programs: Dict[Tuple[str, int, tuple], Optional[DeviceBuffer]] = {}

    @classmethod
    def of(cls, row_ptr: np.ndarray, col_idx: np.ndarray, values: np.ndarray,
           shape: Tuple[int, int, int, int], groups: int) -> "CsrStore":
        """A store with a pattern of its own."""
        return cls(Pattern(row_ptr, col_idx, shape, groups), values)

    def with_values(self, values: np.ndarray) -> "CsrStore":
        """A store of `values` (one per nonzero, in this store's order) on this pattern."""
        return CsrStore(self.pattern, values, derived=True)

    # The pattern's, for the filter and for prepared calls (which check the generation).
    @property
    def row_ptr(self) -> np.ndarray:
        return self.pattern.row_ptr

    @property
    def col_idx(self) -> np.ndarray:
        return self.pattern.col_idx

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return self.pattern.shape

    @property
    def groups(self) -> int:
        return self.pattern.groups

    @property
    def generation(self) -> int:
        return self.pattern.generation

    @property
    def generation_cell(self) -> np.ndarray:
        return self.pattern.generation_cell

    def offsets(self, desc: tuple) -> np.ndarray:
        return self.pattern.offsets(desc)

    def release_geometries(self) -> int:
        """Drops the pattern's per-geometry caches (shared with the filters of other values on
        it) and this store's programs; returns the bytes they held."""
        released = self.pattern.release_geometries()  # (first: it moves the generation on)
        with self.lock:
            held = [b.nbytes for b in self.device_programs.values() if b is not None]
            self.device_programs.clear()
        return released + sum(held)

    def values_as(self, dtype: np.dtype) -> np.ndarray:
        with self.lock:
            found = self.host_values.get(dtype)
            if found is None:
                found = self.host_values[dtype] = frozen(self.values.astype(dtype))
            return found

    def program(self, kind: str, desc: tuple) -> Optional[np.ndarray]:
        """A CUDA kernel's program for this geometry (host bytes): the staged kernel's ("tile")
        or the tensor-core kernel's ("mma"); None where that kernel would not pay or run."""
        values32 = self.values_as(np.dtype(np.float32))
        if kind == "tile" and self.derived:
            layout = self.pattern.tile_layout(desc, values32)
            if layout is None:
                return None
            program = layout.program.copy()
            program.view(np.float32)[layout.slots] = values32
            return program
        return self.pattern.program(kind, desc, values32)

    def device_program(self, kind: str, device: int, desc: tuple) -> int:
        """The device address of a CUDA kernel's program (`kind` as in program()) for desc on
        `device`, built and uploaded once per device and geometry; 0 where there is none."""
        def build() -> Optional[DeviceBuffer]:
            host = self.program(kind, desc)
            return None if host is None else DeviceBuffer.from_host(host, device)

        program = built_once(self.lock, self.device_programs, (kind, device, offsets_key(desc)),
                             build)
        return 0 if program is None else program.ptr

    def device_tile_layout(self, device: int, desc: tuple) -> Optional[DeviceTileLayout]:
        """The pattern's tile layout for desc on `device` (None where the staged kernel would
        not pay), uploaded once."""
        return self.pattern.device_tile_layout(device, desc, self.values_as(np.dtype(np.float32)))

    def program_of_device_values(self, device: int, desc: tuple, values: int,
                                 stream: int) -> Optional[DeviceBuffer]:
        """The staged kernel's program for desc and the float32 values at device address
        `values` (one per nonzero, in this pattern's order), written on `stream` into memory
        allocated (and, when the buffer goes, freed) on it; None where that kernel would not
        pay. No host copy of the values, no synchronisation once the pattern's layout is on the
        device."""
        layout = self.device_tile_layout(device, desc)
        if layout is None:
            return None
        program = DeviceBuffer(layout.program.nbytes, device, stream)
        _core.tile_program_write_weights(program.ptr, layout.program.ptr, program.nbytes,
                                         layout.slots.ptr, values, self.col_idx.size, device,
                                         stream)
        return program

    def device_arrays(self, device: int, desc: tuple) -> DevicePointers:
        """The filter's device arrays for desc on `device`, uploaded once per device and geometry.
        The tile program (~8 bytes per nonzero) is built once a batch the staged kernel runs
        for asks (from _core.tile_min_batch() images: now 1, since the staged kernel beat the
        streaming one at batch 1 too)."""
        values32 = self.values_as(np.dtype(np.float32))
        with self.lock:
            values = self.device_values.get(device)
            if values is None:
                values = self.device_values[device] = DeviceBuffer.from_host(values32, device)
        row_ptr, offsets = self.pattern.device_arrays(device, desc)
        wants_program = desc[0] >= _core.tile_min_batch()
        program = self.device_program("tile", device, desc) if wants_program else 0
        return DevicePointers(row_ptr, offsets, values.ptr, program)


def built_once(lock: threading.Lock, table: Dict[Any, Any], key: Any,
               build: Callable[[], Any]) -> Any:
    """table[key], built by build() where missing (None too is kept: "nothing to build"). Built
    outside the lock, since builders take it themselves (offsets(), tile_layout()); threads
    racing to a missing key both build, and every one gets the value stored first."""
    with lock:
        if key in table:
            return table[key]
    built = build()
    with lock:
        return table.setdefault(key, built)


def frozen(array: np.ndarray) -> np.ndarray:
    """A copy of a 1-d array in immutable memory (bytes): no array over it, nor the memory's
    owner, can be made writeable, so what the CPU kernel trusts (a filter's own offsets, the
    count in row_ptr) stays as escoin made it."""
    return np.frombuffer(np.ascontiguousarray(array).tobytes(), array.dtype)


def offsets_key(desc: tuple) -> tuple:
    # Offsets depend on everything but the batch (field 0) and the output channels (field 4).
    return desc[1:4] + desc[5:]
