"""Zero-copy file-backed tensors that cross DataLoader process boundaries as file descriptors, not as copies.

A cache entry is read by memory-mapping its file (copy-on-write, `MAP_PRIVATE`): the tensor's bytes are the page
cache's pages, nothing is copied. Sent from a DataLoader worker to the main process, torch would copy such a
tensor into fresh shared memory — and on a virtual machine, faulting in fresh pages costs several times more than
copying the bytes (64×512×512 float16: ≈ 20 ms to fault in 32 MiB of new shared memory, ≈ 2.5 ms to copy it into
pages that already exist). Instead, `enable_zero_copy_sharing()` teaches the multiprocessing pickler to send a
storage that maps a whole file as a descriptor of that file, and the receiver maps the same file again: the main
process gets the page-cache pages too, and the bytes are copied once, by whoever consumes them (the pinned-memory
copy before a host→device transfer, or a batch stack).

Both sides map copy-on-write, so writing into a received or transformed tensor never changes the file. Storages
not made by `map_file` take torch's own path unchanged.
"""

from __future__ import annotations

import mmap
import os
from multiprocessing import reduction
from pathlib import Path

import torch


# data address of a storage made by `map_file` → (weak reference to that storage, path, (st_dev, st_ino), nbytes)
_MAPPED: dict[int, tuple[object, str, tuple[int, int], int]] = {}
_torch_reduce_storage = None


def map_file(path: str | os.PathLike) -> torch.Tensor:
    """The whole file as a 1-D uint8 tensor over a private (copy-on-write) memory map; no descriptor stays open.

    Views of it (`tensor[a:b].view(dtype).view(shape)`) are sent between processes as the file, not as bytes,
    once `enable_zero_copy_sharing()` has run in the sending process.
    """
    from torch.multiprocessing.reductions import StorageWeakRef

    path = str(Path(path).resolve())
    status = os.stat(path)
    if status.st_size == 0:
        raise ValueError(f"{path}: empty file, nothing to map")
    tensor = torch.from_file(path, shared=False, size=status.st_size, dtype=torch.uint8)
    storage = tensor.untyped_storage()
    _forget_dead_mappings()
    _MAPPED[storage.data_ptr()] = (StorageWeakRef(storage), path, (status.st_dev, status.st_ino), status.st_size)
    enable_zero_copy_sharing()
    return tensor


def is_mapped(tensor: torch.Tensor) -> bool:
    """Whether `tensor` views a storage made by `map_file` (in this process, or received as a file from another)."""
    entry = _MAPPED.get(tensor.untyped_storage().data_ptr())
    return entry is not None and not entry[0].expired()


def enable_zero_copy_sharing() -> None:
    """Send storages made by `map_file` between processes as file descriptors (idempotent; other storages keep
    torch's shared-memory path). Runs on the first `map_file`, so DataLoader workers enable it themselves."""
    global _torch_reduce_storage
    if _torch_reduce_storage is not None:
        return
    # Importing torch.multiprocessing registers torch's reducers; ours must come after them to take effect.
    import torch.multiprocessing.reductions as torch_reductions

    _torch_reduce_storage = torch_reductions.reduce_storage
    reduction.ForkingPickler.register(torch.UntypedStorage, _reduce_storage)


def _forget_dead_mappings() -> None:
    for address in [a for a, entry in _MAPPED.items() if entry[0].expired()]:
        del _MAPPED[address]


def _reduce_storage(storage: torch.UntypedStorage):
    entry = _MAPPED.get(storage.data_ptr()) if storage.device.type == "cpu" else None
    if entry is not None and not entry[0].expired() and storage.nbytes() == entry[3]:
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
                    return (_rebuild_storage, (reduction.DupFd(fd), path, identity, nbytes))
            finally:
                os.close(fd)  # DupFd holds its own duplicate until the receiver has taken it
        # The file is gone or another one took its name: send a copy. torch's own path cannot take the storage as
        # it is: it sees a file mapping, takes it for shared memory and has no descriptor to send.
        copy = torch.UntypedStorage._new_shared(storage.nbytes())
        copy.copy_(storage)
        return _torch_reduce_storage(copy)
    return _torch_reduce_storage(storage)


def _rebuild_storage(dup_fd, path: str, identity: tuple[int, int], nbytes: int) -> torch.UntypedStorage:
    """Map the sender's file (by the descriptor it sent, so a file renamed over the path meanwhile is not taken)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    fd = dup_fd.detach()
    try:
        mapping = mmap.mmap(fd, nbytes, access=mmap.ACCESS_COPY)  # private: writes never reach the file
    finally:
        os.close(fd)  # mmap keeps its own duplicate while it lives
    storage = torch.frombuffer(mapping, dtype=torch.uint8).untyped_storage()  # holds `mapping` alive
    _forget_dead_mappings()
    _MAPPED[storage.data_ptr()] = (StorageWeakRef(storage), path, identity, nbytes)
    enable_zero_copy_sharing()
    return storage
