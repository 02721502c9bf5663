"""The activations a stage-wise calibration keeps: every batch's value of a node, within a budget.

Each value of the graph is held once per calibration batch (a ``Values``: one slot per batch).
The store counts the bytes of the tensor storages it holds (a view and its base count once) and,
when asked to make room, writes the slots needed furthest in the future to a temporary directory
(Belady's rule, with the propagation's liveness as the oracle); a spilled slot is read back on
each use. The directory is deleted when the store closes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves


def _storages(item: Any) -> dict[int, int]:
    """The tensor storages ``item`` holds (nested tuples, lists and dicts too): ptr -> bytes."""
    found: dict[int, int] = {}
    for leaf in tree_leaves(item):
        if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
            storage = leaf.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


class Slot:
    """One batch's value: in memory (``item``) or on disk (``path``)."""

    __slots__ = ("item", "nbytes", "owner", "path", "storages")

    def __init__(self, item: Any, owner: Hashable) -> None:
        self.item = item
        self.owner = owner
        self.path: Path | None = None
        self.storages = _storages(item)
        self.nbytes = sum(self.storages.values())


class Values:
    """A node's value on every calibration batch (or one constant shared by all batches)."""

    def __init__(self, store: Store, owner: Hashable, constant: bool = False) -> None:
        self.store = store
        self.owner = owner
        self.constant = constant
        self.slots: list[Slot] = []

    def append(self, item: Any) -> None:
        self.slots.append(self.store.hold(item, self.owner))

    def __getitem__(self, batch: int) -> Any:
        return self.store.read(self.slots[0 if self.constant else batch])

    def __len__(self) -> int:
        return len(self.slots)

    def __iter__(self):
        for index in range(len(self.slots)):
            yield self[index]

    def release(self) -> None:
        for slot in self.slots:
            self.store.drop(slot)
        self.slots = []


class Store:
    """Slots of every live value, ``limit`` bytes at most in memory when ``make_room`` asks."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.resident = 0
        self.peak = 0
        self.spilled = 0  # bytes written to disk, in all
        self.reads = 0  # bytes read back
        self._slots: dict[int, Slot] = {}
        self._refs: dict[int, list[int]] = {}  # storage ptr -> [bytes, slots holding it]
        self._directory: tempfile.TemporaryDirectory | None = None
        self._files = 0
        self.priority: Callable[[Hashable], float] = lambda owner: 0.0

    def hold(self, item: Any, owner: Hashable) -> Slot:
        slot = Slot(item, owner)
        self._slots[id(slot)] = slot
        self._count(slot, +1)
        return slot

    def read(self, slot: Slot) -> Any:
        if slot.path is None:
            return slot.item
        self.reads += slot.nbytes
        return torch.load(slot.path, weights_only=False)

    def drop(self, slot: Slot) -> None:
        if self._slots.pop(id(slot), None) is None:
            return
        if slot.path is None:
            self._count(slot, -1)
        else:
            slot.path.unlink(missing_ok=True)
        slot.item = None

    def _count(self, slot: Slot, sign: int) -> None:
        for pointer, nbytes in slot.storages.items():
            entry = self._refs.setdefault(pointer, [nbytes, 0])
            if sign > 0 and entry[1] == 0:
                self.resident += nbytes
            entry[1] += sign
            if entry[1] == 0:
                self.resident -= nbytes
                del self._refs[pointer]
        self.peak = max(self.peak, self.resident)

    def make_room(self, extra: int = 0, keep: Callable[[Hashable], bool] | None = None) -> None:
        """Spill slots, furthest next use first, until ``extra`` more bytes fit the limit."""
        if self.resident + extra <= self.limit:
            return
        candidates = [
            s
            for s in self._slots.values()
            if s.path is None and s.nbytes and (keep is None or not keep(s.owner))
        ]
        candidates.sort(key=lambda s: self.priority(s.owner), reverse=True)
        for slot in candidates:
            if self.resident + extra <= self.limit:
                break
            self._spill(slot)

    def _spill(self, slot: Slot) -> None:
        if self._directory is None:
            self._directory = tempfile.TemporaryDirectory(prefix="ghostify-calibration-")
        path = Path(self._directory.name) / f"{self._files}.pt"
        self._files += 1
        torch.save(slot.item, path)
        self.spilled += slot.nbytes
        self._count(slot, -1)
        slot.item = None
        slot.path = path

    def close(self) -> None:
        for slot in list(self._slots.values()):
            self.drop(slot)
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None
