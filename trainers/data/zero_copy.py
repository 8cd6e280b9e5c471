"""Tensors that leave DataLoader workers without being copied into fresh shared memory.

Sent from a worker to the main process, a CPU tensor normally goes into new shared memory, and on a virtual
machine faulting in new pages costs several times more than copying the bytes (64×512×512 float16, measured on
the 2-core development VM: ≈ 20 ms to fault in 32 MiB of new shared memory, ≈ 2.5 ms to copy 32 MiB into pages
that already exist). Two kinds of storage avoid it; the multiprocessing pickler learns about both in
`enable_zero_copy_sharing()` and keeps torch's own path for every other storage.

- **File mappings** (`map_file`): a cache entry mapped copy-on-write (`MAP_PRIVATE`), its tensors views of the page
  cache. Such a storage is sent as a descriptor of its file and the receiver maps the same file: nothing is copied
  until the consumer reads the bytes (the pinned-memory copy before a host→device transfer, or a batch stack).
  Writes on either side stay private, so no consumer or transform can change a cache file.
- **Recycled batch buffers** (`shared_batch_buffer`): a batch stacked in a worker goes into shared memory that the
  worker keeps and reuses. The receiver maps it and, when the last tensor over it is freed, marks it free again in
  its header; only then does the worker write a new batch into it. A batch that the main process keeps is never
  overwritten: the worker takes another buffer. The pool holds as many buffers as batches were alive at once.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from multiprocessing import reduction
from pathlib import Path

import torch
import torch.multiprocessing


# data address of a storage made by `map_file` → (weak reference to that storage, path, (st_dev, st_ino), nbytes)
_MAPPED: dict[int, tuple[object, str, tuple[int, int], int]] = {}
# A recycled buffer starts with this many header bytes (an int32 in-use flag; keeps the data 64-byte aligned).
BUFFER_HEADER_BYTES = 64
# data bytes → this worker's recycled buffers of that size; data address → buffer (for the pickler)
_POOL: dict[int, list[_BatchBuffer]] = {}
_POOL_BY_ADDRESS: dict[int, _BatchBuffer] = {}
_torch_reduce_storage = None
# The DataLoader's pin-memory thread unpickles (and so registers mappings) beside the main thread.
_LOCK = threading.Lock()


def map_file(path: str | os.PathLike) -> torch.Tensor:
    """The whole file as a 1-D uint8 tensor over a private (copy-on-write) memory map; no descriptor stays open.

    Views of it (`tensor[a:b].view(dtype).view(shape)`) are sent between processes as the file, not as bytes.

    Raises:
        ValueError: the file is empty (nothing to map).
    """
    path = str(Path(path).resolve())
    status = os.stat(path)
    if status.st_size == 0:
        raise ValueError(f"{path}: empty file, nothing to map")
    tensor = torch.from_file(path, shared=False, size=status.st_size, dtype=torch.uint8)
    storage = tensor.untyped_storage()
    _register_mapping(storage, path, (status.st_dev, status.st_ino))
    return tensor


def is_mapped(tensor: torch.Tensor) -> bool:
    """Whether `tensor` views a storage made by `map_file` (in this process, or received as a file from another)."""
    entry = _MAPPED.get(tensor.untyped_storage().data_ptr())
    return entry is not None and not entry[0].expired()


class _BatchBuffer:
    """One recycled shared-memory buffer of a worker: header (in-use flag) + data."""

    def __init__(self, nbytes: int):
        self.storage = torch.UntypedStorage._new_shared(BUFFER_HEADER_BYTES + nbytes)
        self.fd, _ = self.storage._share_fd_cpu_()  # already shared: torch hands out its descriptor, no copy
        self.in_use = torch.empty(0, dtype=torch.int32).set_(self.storage, 0, (1,))
        self.sent = False

    def take(self) -> bool:
        if int(self.in_use[0]):
            return False
        self.in_use.fill_(1)  # until the receiver has freed every tensor over it
        self.sent = False
        return True


def shared_batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory for a batch that a DataLoader worker sends to the main process.

    With torch's `file_descriptor` sharing strategy (the Linux default) the memory comes from this process's pool
    of recycled buffers, free again once the receiver has dropped the batch; otherwise it is fresh shared memory.
    """
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if torch.multiprocessing.get_sharing_strategy() != "file_descriptor":
        storage = torch.UntypedStorage._new_shared(nbytes)
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)
    enable_zero_copy_sharing()
    buffers = _POOL.setdefault(nbytes, [])
    buffer = next((b for b in buffers if b.take()), None)
    if buffer is None:
        buffer = _BatchBuffer(nbytes)
        buffer.take()
        buffers.append(buffer)
        _POOL_BY_ADDRESS[buffer.storage.data_ptr()] = buffer
    return torch.empty(0, dtype=dtype).set_(buffer.storage, BUFFER_HEADER_BYTES // dtype.itemsize, shape)


def enable_zero_copy_sharing() -> None:
    """Send file mappings and recycled batch buffers between processes without copies (idempotent; other storages
    keep torch's shared-memory path). Runs on first use, so DataLoader workers enable it themselves."""
    global _torch_reduce_storage
    if _torch_reduce_storage is not None:
        return
    # Importing torch.multiprocessing registers torch's reducers; ours must come after them to take effect.
    import torch.multiprocessing.reductions as torch_reductions

    _torch_reduce_storage = torch_reductions.reduce_storage
    reduction.ForkingPickler.register(torch.UntypedStorage, _reduce_storage)


def _register_mapping(storage: torch.UntypedStorage, path: str, identity: tuple[int, int]) -> None:
    from torch.multiprocessing.reductions import StorageWeakRef

    with _LOCK:
        for address in [a for a, entry in _MAPPED.items() if entry[0].expired()]:
            del _MAPPED[address]
        _MAPPED[storage.data_ptr()] = (StorageWeakRef(storage), path, identity, storage.nbytes())
    enable_zero_copy_sharing()


def _reduce_storage(storage: torch.UntypedStorage):
    if storage.device.type != "cpu":
        return _torch_reduce_storage(storage)
    address = storage.data_ptr()
    buffer = _POOL_BY_ADDRESS.get(address)
    if buffer is not None and storage.nbytes() == buffer.storage.nbytes():
        if not buffer.sent:  # one receiver owns it; a second one gets a copy below
            buffer.sent = True
            return (_rebuild_batch_buffer, (reduction.DupFd(buffer.fd), storage.nbytes()))
        return _reduce_copy(storage)
    entry = _MAPPED.get(address)
    if entry is None or entry[0].expired() or storage.nbytes() != entry[3]:
        return _torch_reduce_storage(storage)
    _, path, identity, nbytes = entry
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        fd = None
    if fd is not None:
        try:
            status = os.fstat(fd)
            # The same file, not a later entry renamed over it: only then can the receiver map it instead.
            if (status.st_dev, status.st_ino) == identity:
                return (_rebuild_mapped_file, (reduction.DupFd(fd), path, identity, nbytes))
        finally:
            os.close(fd)  # DupFd holds its own duplicate until the receiver has taken it
    # The file is gone or another one took its name: send a copy.
    return _reduce_copy(storage)


def _reduce_copy(storage: torch.UntypedStorage):
    """torch's path for a copy in new shared memory. Not for the storage itself: torch takes a file mapping for
    shared memory and has no descriptor to send, and would send a batch buffer without its release protocol."""
    copy = torch.UntypedStorage._new_shared(storage.nbytes())
    copy.copy_(storage)
    return _torch_reduce_storage(copy)


def _rebuild_mapped_file(dup_fd, path: str, identity: tuple[int, int], nbytes: int) -> torch.UntypedStorage:
    """Map the sender's file (by the descriptor it sent, so a file renamed over the path meanwhile is not taken)."""
    fd = dup_fd.detach()
    try:
        mapping = mmap.mmap(fd, nbytes, access=mmap.ACCESS_COPY)  # private: writes never reach the file
    finally:
        os.close(fd)  # mmap keeps its own duplicate while it lives
    storage = torch.frombuffer(mapping, dtype=torch.uint8).untyped_storage()  # holds `mapping` alive
    _register_mapping(storage, path, identity)
    return storage


def _rebuild_batch_buffer(dup_fd, nbytes: int) -> torch.UntypedStorage:
    """Map a worker's batch buffer; when the last tensor over it is freed, mark it free for the worker."""
    fd = dup_fd.detach()
    try:
        mapping = mmap.mmap(fd, nbytes)  # shared: the buffer is this process's alone until it is marked free
    except BaseException:
        os.close(fd)
        raise
    storage = torch.frombuffer(mapping, dtype=torch.uint8).untyped_storage()  # holds `mapping` alive
    weakref.finalize(mapping, _mark_free, fd)
    return storage


def _mark_free(fd: int) -> None:
    # Written through the descriptor, not the mapping, which is being torn down when this runs.
    try:
        os.pwrite(fd, bytes(4), 0)
    finally:
        os.close(fd)
