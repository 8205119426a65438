"""Columnar rings: every series of one kind side by side, so a step is one column write.

A tier holds ``slots`` points per row (a row is one series), in blocks of ``BLOCK`` rows, each
block a ``slots x BLOCK`` array: the point of every row at one step lies contiguous, so recording
a step for a million series is a few hundred block-row copies, not a Python loop per series.

Points are stored *raw*: the float's bits XOR the bits of NaN, so that zero bytes read as NaN.
New blocks are ``np.zeros`` (pages the kernel hands over on first touch, never written twice), a
gap is a slice of zeros, and a series freed for reuse is zeroed: no NaN fill anywhere.

A store is one kind of series (the built-in figures in float16, plugin figures in float32): its
two tiers, each row's ``current`` value (written by ingest-side gathering, copied into the fine
tier at each step) and whether a row was ever known. Rows are handed out in runs (a worker's
nine figures, a GPU's five) against a byte budget shared by the stores.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

BLOCK = 4096
"""Rows per block: memory grows in blocks (1.1 MB at the default tiers), a step costs a few
microseconds per block."""
POINTS_PER_PART = 8 * BLOCK * 10
"""Fine points averaged by a coarse close between two yields (about 1-2 ms of work): eight
blocks of ten points a row, one block of sixty."""


class Codec:
    """Floats of ``dtype`` stored as raw unsigned bits XOR NaN's bits: zero reads as NaN."""

    def __init__(self, dtype: type) -> None:
        self.float = np.dtype(dtype)
        self.raw = np.dtype(f"u{self.float.itemsize}")
        self.nan = np.array(np.nan, self.float).view(self.raw)[()]
        self.max = float(np.finfo(self.float).max)

    def encode(self, values: np.ndarray) -> np.ndarray:
        clipped = np.clip(values, -self.max, self.max)  # past float16's 65,504: its largest
        return np.ascontiguousarray(clipped, dtype=self.float).view(self.raw) ^ self.nan

    def decode(self, raw: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        """As float64 by default (what the answer's arithmetic uses)."""
        return (np.ascontiguousarray(raw) ^ self.nan).view(self.float).astype(dtype)


class Budget:
    """Bytes the stores may take (``history.max_bytes``); what does not fit is refused."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.max_bytes:
            return False
        self.used += size
        return True


class Tier:
    """One tier of every row of a store: ``slots`` points a row, in blocks of raw columns."""

    def __init__(self, slots: int, raw: np.dtype) -> None:
        self.slots, self.raw = slots, raw
        self.blocks: list[np.ndarray] = []
        self.last = -1
        """The absolute index (time // step) of the newest column written."""

    def grow(self, blocks: int) -> None:
        while len(self.blocks) < blocks:
            self.blocks.append(np.zeros((self.slots, BLOCK), self.raw))

    def put(self, index: int, column: np.ndarray) -> None:
        """Write ``column`` (raw, one point per row, ``len(blocks) * BLOCK`` long) at ``index``;
        the columns skipped since the newest become gaps, a column older than the ring is
        dropped."""
        if index <= self.last - self.slots:
            return
        if index > self.last:
            skipped = np.arange(max(self.last + 1, index - self.slots + 1), index) % self.slots
            if self.last >= 0 and len(skipped):
                for block in self.blocks:
                    block[skipped] = 0
            self.last = index
        slot = index % self.slots
        for number, block in enumerate(self.blocks):
            block[slot] = column[number * BLOCK:(number + 1) * BLOCK]

    def held(self, first: int, last: int) -> tuple[int, int]:
        """The part of ``first..last`` (absolute indices) the ring holds (empty if low > high)."""
        return max(first, self.last - self.slots + 1), min(last, self.last)

    def read(self, first: int, last: int, rows: np.ndarray) -> np.ndarray:
        """Raw points ``first..last`` of ``rows``: shape ``(len(rows), last - first + 1)``, zero
        (NaN) where the ring holds nothing."""
        out = np.zeros((len(rows), max(0, last - first + 1)), self.raw)
        low, high = self.held(first, last)
        if low > high or not len(rows):
            return out
        slots = np.arange(low, high + 1) % self.slots
        blocks, local = np.divmod(rows, BLOCK)
        for number in np.unique(blocks):
            chosen = blocks == number
            out[chosen, low - first:high - first + 1] = \
                self.blocks[number][np.ix_(slots, local[chosen])].T
        return out

    def clear(self, rows: np.ndarray) -> None:
        blocks, local = np.divmod(rows, BLOCK)
        for number in np.unique(blocks):
            self.blocks[number][:, local[blocks == number]] = 0


class Store:
    """The series of one kind: two tiers, the current value and the ever-known flag of each row,
    rows handed out in runs against the shared budget. The last element of ``current`` is a
    sink: the rows of a refused series point there, so gathering needs no test per value."""

    def __init__(self, codec: Codec, fine_slots: int, coarse_slots: int, budget: Budget) -> None:
        self.codec, self.budget = codec, budget
        self.fine = Tier(fine_slots, codec.raw)
        self.coarse = Tier(coarse_slots, codec.raw)
        self.row_bytes = codec.raw.itemsize * (fine_slots + coarse_slots + 1) + 1
        """What a row costs: its two rings, its current value, its known flag."""
        self.rows = 0
        """Rows handed out so far (freed ones are reused before new ones are taken)."""
        self.current = np.zeros(1, codec.raw)
        """Each row's value for the next step, then a sink (the last element)."""
        self.known = np.zeros(1, bool)
        self._free: dict[int, list[int]] = {}

    @property
    def capacity(self) -> int:
        return len(self.fine.blocks) * BLOCK

    def allocate(self, size: int) -> int | None:
        """The first of ``size`` new rows, all NaN; None past the budget."""
        free = self._free.get(size)
        if free:
            return free.pop()
        if not self.budget.take(size * self.row_bytes):
            return None
        first, self.rows = self.rows, self.rows + size
        if self.rows > self.capacity:
            blocks = -(-self.rows // BLOCK)
            self.fine.grow(blocks)
            self.coarse.grow(blocks)
        if self.rows >= len(self.current):  # room doubled: a growing fleet copies it rarely
            length = max(self.capacity, 2 * (len(self.current) - 1)) + 1
            current = np.zeros(length, self.codec.raw)
            current[:len(self.current) - 1] = self.current[:-1]
            known = np.zeros(length, bool)
            known[:len(self.known) - 1] = self.known[:-1]
            self.current, self.known = current, known
        return first

    def release(self, first: int, size: int) -> None:
        """Rows ``first..first + size - 1`` become NaN and free for the next series of that
        size."""
        rows = np.arange(first, first + size)
        self.fine.clear(rows)
        self.coarse.clear(rows)
        self.current[rows] = 0
        self.known[rows] = False
        self._free.setdefault(size, []).append(first)

    def step(self, index: int) -> None:
        """The fine point of every row at ``index``: its current value."""
        self.fine.put(index, self.current[:-1])

    def closing(self, bucket: int, first: int, last: int) -> Iterator[None]:
        """The coarse point of every row for ``bucket``: the mean of its known fine points
        ``first..last`` (NaN if none), ``POINTS_PER_PART`` points at a time with a yield
        between (a million series of ten points take about 100 ms)."""
        if bucket <= self.coarse.last - self.coarse.slots or not self.rows:
            return
        column = np.zeros(self.capacity, self.codec.raw)
        low, high = self.fine.held(first, last)
        if low <= high:
            slots = np.arange(low, high + 1) % self.fine.slots
            per_part = max(1, POINTS_PER_PART // (BLOCK * len(slots)))
            for number, block in enumerate(self.fine.blocks):
                points = self.codec.decode(block[slots], np.float32)
                mean, seen = nan_mean(points, axis=0)
                part = slice(number * BLOCK, (number + 1) * BLOCK)
                column[part] = self.codec.encode(mean)
                self.known[part] |= seen
                if number % per_part == per_part - 1:
                    yield
        self.coarse.put(bucket, column)


def nan_mean(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean of the known (not NaN) values along ``axis`` (NaN where none is), and where any
    was known."""
    known = ~np.isnan(values)
    count = known.sum(axis=axis)
    total = np.where(known, values, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count, count > 0
