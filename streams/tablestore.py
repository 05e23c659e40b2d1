"""Write-back buffering of the worker's table state, flushed before each commit.

A Faust table write costs a changelog record each time; the worker changes a
device's state on every reading, so writing through would send one changelog
record per reading. :class:`WriteBackStore` keeps the changed values in memory
and writes each changed key once, just before the worker commits its source
offsets (see ``FlushingConsumer`` in :mod:`streams.app`).

It also keeps decoded state objects (:meth:`WriteBackStore.load` and
:meth:`WriteBackStore.save`), so a busy device's state is decoded once and
encoded once per commit instead of once per message.

Why this keeps the guarantees: a value is only ever lost together with the
offsets that produced it. State still in memory belongs to records whose offsets
are not committed yet, so after a crash or rebalance they are read again and the
state is rebuilt; nothing is committed before its state is in the changelog.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, Protocol, TypeVar


class Encodable(Protocol):
    """A decoded state object that knows its byte form."""

    def encode(self) -> bytes:
        """Return the state as the bytes stored in the table."""
        ...


T = TypeVar("T", bound=Encodable)

# Decoded objects kept after a flush; beyond this the oldest clean ones go.
DEFAULT_MAX_CACHED = 5_000


class WriteBackStore(MutableMapping[bytes, bytes]):
    """A byte-keyed view of a Faust table that buffers writes until :meth:`flush`.

    Set :attr:`partition` to the partition of the record being processed before
    writing: it is the changelog partition of every key written meanwhile (a key
    always belongs to one partition, the one of its device).

    Values are written as bytes (``store[key] = value``) or as decoded objects
    (:meth:`save`), which are encoded only when flushed or read as bytes.

    Not thread-safe; used by the one agent of the worker and its commit hook,
    both on the event loop.
    """

    def __init__(self, table: Any, *, max_cached: int = DEFAULT_MAX_CACHED) -> None:
        self._table = table
        self._max_cached = max_cached
        # key -> (bytes or decoded object, changelog partition)
        self._dirty: dict[bytes, tuple[Any, int]] = {}
        # key -> decoded object equal to the table's value or to the dirty one
        self._objects: dict[bytes, Any] = {}
        self.partition: int | None = None

    def __getitem__(self, key: bytes) -> bytes:
        entry = self._dirty.get(key)
        if entry is not None:
            value = entry[0]
            return value if isinstance(value, bytes) else bytes(value.encode())
        value = self._table.data.get(key)
        if value is None:
            raise KeyError(key)
        return bytes(value)

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self._dirty[key] = (value, self._write_partition())
        self._objects.pop(key, None)

    def __delitem__(self, key: bytes) -> None:
        raise NotImplementedError("the worker never deletes table state")

    def __iter__(self) -> Iterator[bytes]:
        keys = set(self._table.data.keys()) | set(self._dirty)
        return iter(keys)

    def __len__(self) -> int:
        return len(set(self._table.data.keys()) | set(self._dirty))

    def load(self, key: bytes, decode: Callable[[bytes | None], T]) -> T:
        """Return the decoded state of ``key`` (``decode(None)`` when there is none).

        The object returned is the one kept here: change it, then :meth:`save` it.
        """
        found = self._objects.get(key)
        if found is not None:
            return found  # type: ignore[no-any-return]
        entry = self._dirty.get(key)
        raw = entry[0] if entry is not None else self._table.data.get(key)
        obj = decode(None if raw is None else bytes(raw))
        if raw is not None:
            self._objects[key] = obj
        return obj

    def save(self, key: bytes, obj: Encodable) -> None:
        """Mark the decoded ``obj`` as the new state of ``key``."""
        self._dirty[key] = (obj, self._write_partition())
        self._objects[key] = obj

    @property
    def dirty_count(self) -> int:
        """Return how many keys wait to be written to the changelog."""
        return len(self._dirty)

    @property
    def cached_count(self) -> int:
        """Return how many decoded objects are kept."""
        return len(self._objects)

    def flush(self) -> int:
        """Write every changed key to the table and its changelog; return how many.

        The changelog records go to Faust's producer buffer; the caller flushes
        the producer before committing offsets.
        """
        dirty, self._dirty = self._dirty, {}
        for key, (value, partition) in dirty.items():
            data = value if isinstance(value, bytes) else value.encode()
            self._table.data[key] = data
            self._table.send_changelog(partition, key, data)
        excess = len(self._objects) - self._max_cached
        if excess > 0:
            for key in list(self._objects)[:excess]:
                del self._objects[key]
        return len(dirty)

    def discard(self) -> None:
        """Drop unwritten changes and decoded objects (their records are read again)."""
        self._dirty.clear()
        self._objects.clear()

    def forget_objects(self) -> None:
        """Drop the decoded objects (after a flush, when partitions change hands)."""
        self._objects.clear()

    def _write_partition(self) -> int:
        if self.partition is None:
            raise RuntimeError("set WriteBackStore.partition before writing")
        return self.partition
