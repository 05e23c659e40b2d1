"""Write-back buffering of the worker's table state, flushed before each commit.

A Faust table write costs a changelog record each time; the worker changes a
series' state on every reading, so writing through would send one changelog
record per reading per table. :class:`WriteBackStore` keeps the changed values in
memory and writes each changed key once, just before the worker commits its
source offsets (see ``FlushingConsumer`` in :mod:`streams.app`).

Why this keeps the guarantees: a value is only ever lost together with the
offsets that produced it. State still in memory belongs to records whose offsets
are not committed yet, so after a crash or rebalance they are read again and the
state is rebuilt; nothing is committed before its state is in the changelog.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any


class WriteBackStore(MutableMapping[bytes, bytes]):
    """A byte-keyed view of a Faust table that buffers writes until :meth:`flush`.

    Set :attr:`partition` to the partition of the record being processed before
    writing: it is the changelog partition of every key written meanwhile (a key
    always belongs to one partition, the one of its device).

    Not thread-safe; used by the one agent of the worker and its commit hook,
    both on the event loop.
    """

    def __init__(self, table: Any) -> None:
        self._table = table
        self._dirty: dict[bytes, tuple[bytes, int]] = {}
        self.partition: int | None = None

    def __getitem__(self, key: bytes) -> bytes:
        entry = self._dirty.get(key)
        if entry is not None:
            return entry[0]
        value = self._table.data.get(key)
        if value is None:
            raise KeyError(key)
        return bytes(value)

    def __setitem__(self, key: bytes, value: bytes) -> None:
        if self.partition is None:
            raise RuntimeError("set WriteBackStore.partition before writing")
        self._dirty[key] = (value, self.partition)

    def __delitem__(self, key: bytes) -> None:
        raise NotImplementedError("the worker never deletes table state")

    def __iter__(self) -> Iterator[bytes]:
        keys = set(self._table.data.keys()) | set(self._dirty)
        return iter(keys)

    def __len__(self) -> int:
        return len(set(self._table.data.keys()) | set(self._dirty))

    @property
    def dirty_count(self) -> int:
        """Return how many keys wait to be written to the changelog."""
        return len(self._dirty)

    def flush(self) -> int:
        """Write every changed key to the table and its changelog; return how many.

        The changelog records go to Faust's producer buffer; the caller flushes
        the producer before committing offsets.
        """
        dirty, self._dirty = self._dirty, {}
        for key, (value, partition) in dirty.items():
            self._table.data[key] = value
            self._table.send_changelog(partition, key, value)
        return len(dirty)

    def discard(self) -> None:
        """Drop unwritten changes (their records will be processed again)."""
        self._dirty.clear()
