"""Caches keyed by tensor contents' identity, for objects that are expensive to derive from tensors.

A custom op only receives tensors, yet escoin needs a built ``SparseFilter`` (host CSR, device
copy, stretched offsets). Rebuilding it on every call would cost a host round trip, so derived
objects are cached by *which memory holds the tensor and how often it was written*:
storage identity, view geometry and the autograd version counter (bumped by every in-place op).

Keys never keep tensors alive: a ``StorageWeakRef`` tells when the storage died, so a new tensor
that happens to reuse a freed address (common with the CUDA caching allocator) is never mistaken
for the old one. An entry also leaves as soon as one of its tensors is freed (``when_freed``), so
deleting a model frees what was derived from it (a filter's device arrays) without waiting for
later calls.

Writes that bypass the version counter (through ``tensor.data``, as ``gradcheck`` perturbs its
inputs, or through NumPy/DLPack aliases), and in-place writes to inference tensors (made under
``torch.inference_mode``, which keep no version counter) are invisible to such keys. Where
comparing contents is cheap (host memory: O(nnz) next to the O(nnz * output) convolution)
callers ask for ``verify=True`` and a hit is also checked against a snapshot; on a GPU that
check would cost a synchronisation per call and is not made.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Dict, Generic, Hashable, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch.multiprocessing.reductions import StorageWeakRef

T = TypeVar("T")


def when_freed(watched: Dict[int, weakref.finalize], tensor: torch.Tensor,
               callback: Callable[[int], None]) -> None:
    """Calls ``callback(storage_id)`` as ``tensor`` is freed, its storage (``storage_id``: the
    ``_cdata`` of its untyped storage then) still alive, unless ``watched`` (a map of the
    tensors being watched, by id) has it watched already. A tensor's entry leaves ``watched`` as
    it is freed, before its id can name another object. Not called at exit."""
    tensor_id = id(tensor)
    if tensor_id in watched:
        return

    def freed(storage_id: int) -> None:
        watched.pop(tensor_id, None)  # (two threads may have watched it at once)
        callback(storage_id)

    finalizer = weakref.finalize(tensor, freed, tensor.untyped_storage()._cdata)
    finalizer.atexit = False
    watched[tensor_id] = finalizer


class TensorStamp:
    """The identity and version of one tensor's contents, held without keeping the tensor alive.

    Neither copyable nor picklable (see ``__reduce_ex__``); owners drop stamps when copied.
    """

    __slots__ = ("_ref", "key")

    def __init__(self, tensor: torch.Tensor) -> None:
        self._ref = StorageWeakRef(tensor.untyped_storage())
        self.key = _contents_key(tensor, self._ref.cdata)

    def matches(self, tensor: torch.Tensor) -> bool:
        """True while ``tensor`` is the same memory, unmodified since the stamp was taken."""
        if self._ref.expired():
            return False
        return self.key == _contents_key(tensor, tensor.untyped_storage()._cdata)

    @property
    def expired(self) -> bool:
        return self._ref.expired()

    def __reduce_ex__(self, protocol: object) -> None:
        # copy and pickle both come here; a copied weak reference would be released twice.
        raise TypeError("TensorStamp cannot be copied or pickled; take a new one instead")


class TensorCache(Generic[T]):
    """A thread-safe map from (tensors, extra hashable data) to a derived value.

    Entries whose tensors died are purged by an insertion that finds the cache twice as large as
    after the last purge (and at least FIRST_PURGE entries), so the cache does not grow with the
    number of tensors that ever passed through, only with the number alive (at most about twice
    it), and a purge's pass over the entries costs each insertion O(1). (A purge at every
    insertion made a training step's new CSR values cost a pass over every layer's entries.)
    Callers whose entries go stale as a group, with tensors still alive, say so (``one_per``):
    a training step's CSR values replace the last step's, whose filter would otherwise keep its
    device memory until a purge (and, through the transposed values it keeps alive, other
    caches' entries too).
    """

    FIRST_PURGE = 64

    def __init__(self) -> None:
        self._entries: Dict[Hashable, _Entry] = {}
        self._lock = threading.Lock()
        self._purge_at = self.FIRST_PURGE
        self._latest: Dict[Hashable, Hashable] = {}  # a group's (one_per) entry
        self._watched: Dict[int, weakref.finalize] = {}  # the keys' tensors (when_freed)
        self._freed: List[int] = []  # storages of freed tensors whose entries must go

    def get(self, tensors: Sequence[torch.Tensor], extra: Hashable, build: Callable[[], T],
            verify: bool = False, one_per: int = 0) -> T:
        """The cached value for these tensors' current contents, built with ``build()`` if absent
        or stale. ``verify`` also compares the contents with a snapshot taken at build time.
        With ``one_per`` k, an entry built replaces the one built last whose first k tensors
        (and extra) are the same: one entry per CSR pattern, say, the latest values'."""
        # (A list made into a tuple, plain loops below: this lookup runs on every call of the
        # op, and generator expressions cost a few microseconds more there.)
        key = (tuple([_contents_key(t, t.untyped_storage()._cdata) for t in tensors]), extra)
        entry = self._entries.get(key)  # a dict read is atomic: no lock
        if entry is not None and entry.valid(tensors):
            return entry.value
        value = build()  # outside the lock: building may launch device work or take long
        snapshot = [t.detach().clone() for t in tensors] if verify else None
        try:
            return self._insert(key, tensors, extra, value, snapshot, one_per)
        finally:
            self._drop_freed()  # (those freed while the lock was held)

    def _insert(self, key: Tuple[tuple, Hashable], tensors: Sequence[torch.Tensor],
                extra: Hashable, value: T, snapshot: Optional[List[torch.Tensor]],
                one_per: int) -> T:
        with self._lock:
            if len(self._entries) >= self._purge_at:
                for stale in [k for k, e in self._entries.items() if e.expired]:
                    del self._entries[stale]
                self._latest = {g: k for g, k in self._latest.items() if k in self._entries}
                self._purge_at = max(self.FIRST_PURGE, 2 * len(self._entries))
            raced = self._entries.get(key)
            if raced is not None and raced.valid(tensors):
                # Another thread built the same meanwhile: every caller gets the value the cache
                # keeps. (A value replaced here would live only as long as its caller's
                # reference: a filter's device arrays freed as soon as the call that built it let
                # go, maybe before the kernel reading them was launched.)
                return raced.value
            self._entries[key] = _Entry([TensorStamp(t) for t in tensors], snapshot, value)
            for t in tensors:
                when_freed(self._watched, t, self._tensor_freed)
            if one_per:
                group = (key[0][:one_per], extra)
                replaced = self._latest.get(group)
                if replaced is not None and replaced != key:
                    self._entries.pop(replaced, None)
                self._latest[group] = key
        return value

    def _tensor_freed(self, storage_id: int) -> None:
        self._freed.append(storage_id)
        self._drop_freed()

    def _drop_freed(self) -> None:
        """Drops the entries of the tensors freed so far. A tensor may be freed with the lock
        held (by another thread, or by this one: dropping an entry frees what its value held,
        and the collector can run anywhere); the holder then drops them as it leaves get() (or,
        where it was already leaving, the next get() or freed tensor does)."""
        if not self._freed or not self._lock.acquire(blocking=False):
            return
        dropped = []  # (released after the lock: their tensors' finalizers come back here)
        try:
            while self._freed:
                storage_id = self._freed.pop()
                for key in [k for k in self._entries
                            if any(contents[0] == storage_id for contents in k[0])]:
                    dropped.append(self._entries.pop(key))
        finally:
            self._lock.release()
        del dropped

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class _Entry:
    __slots__ = ("stamps", "snapshot", "value")

    def __init__(self, stamps: List[TensorStamp], snapshot: Optional[List[torch.Tensor]],
                 value: object) -> None:
        self.stamps, self.snapshot, self.value = stamps, snapshot, value

    @property
    def expired(self) -> bool:
        for stamp in self.stamps:
            if stamp.expired:
                return True
        return False

    def valid(self, tensors: Sequence[torch.Tensor]) -> bool:
        if self.expired:
            return False
        if self.snapshot is not None:
            for old, new in zip(self.snapshot, tensors):
                if not torch.equal(old, new):
                    return False
        return True


def _contents_key(tensor: torch.Tensor, storage_id: int) -> Hashable:
    try:
        version = tensor._version
    except RuntimeError:
        # An inference tensor (made under torch.inference_mode) has no version counter: its
        # contents are taken as written once, as a write through .data is not seen either.
        version = None
    return (storage_id, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype, tensor.device, version)
