"""Throughput of the training data path at seed size (64×512×512 after processing), 2 DataLoader workers.

Paths, all on the same phantom cohort (`rect-vlm synth`):
(a) uncached: every epoch decodes each `.nii.gz` with nibabel and runs the full ReCTImageProcessor pipeline
    ((a') the same with the processor's own reader);
(b) ours: `CachedVolumeDataset` over a warm `VolumeCache`, one volume per item: entries are memory-mapped and reach
    the main process as file mappings, not copies; (b') the same through `ClassificationCollator` in the workers,
    batches of 4 stacked into shared memory (the `Trainer`'s path);
(c) MONAI `PersistentDataset` (warm disk cache of torch-pickled tensors; float32 as MONAI keeps them, and cast to
    float16 before caching like our float16 entries) and `CacheDataset` (in RAM) with the equivalent transforms
    (LoadImage, EnsureChannelFirst, Orientation LPS, Resize, ScaleIntensityRange).

Every path is timed the same way: the main process copies each delivered `pixel_values` once into a reused
staging buffer — the copy into pinned memory that precedes every host→device transfer — so a loader that hands
over lazily mapped pages pays for reading them, as a GPU consumer would. Reported: volumes/s and MB/s of delivered
`pixel_values`, median over timed epochs after one warm-up epoch.

Next to them, the page-cache read limit: one core, no workers, reading each cached entry's `pixel_values` from the
page cache (i) into one reused buffer (memory bandwidth), (ii) into a new tensor each time (plus the page faults
that every new allocation pays), (iii) into new shared memory (what a worker pays to produce a tensor that torch
can pass on without copying).

Usage: python bench/loader.py [--volumes 8] [--shape 96 512 512] [--epochs 3] [--workers 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hf_models import ReCTImageProcessor
from trainers.data.cache import VolumeCache
from trainers.data.collators import ClassificationCollator
from trainers.data.phantom import generate_cohort
from trainers.data.readers import read_ct_rate
from trainers.data.volume_dataset import CachedVolumeDataset


VOLUME_SIZE = [64, 512, 512]


class UncachedDataset(torch.utils.data.Dataset):
    """Decode and process every volume on every access (the baseline). `decoder="nibabel"` decodes with
    `nibabel.load(...).dataobj` as most pipelines do; `decoder="rect"` uses the processor's own reader."""

    def __init__(self, rows, image_processor, decoder: str):
        self.rows, self.image_processor, self.decoder = rows, image_processor, decoder

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = self.rows[index]
        volume = row["volume_path"]
        if self.decoder == "nibabel":
            import nibabel as nib
            import numpy as np

            image = nib.load(volume)
            volume = (np.asanyarray(image.dataobj), image.affine)
        return {
            "pixel_values": self.image_processor.process_volume(
                volume, rescale_slope=row["rescale_slope"], rescale_intercept=row["rescale_intercept"]
            )["pixel_values"]
        }


def monai_transforms(dtype: torch.dtype):
    from monai import transforms as T

    return T.Compose(
        [
            T.LoadImaged(keys="image", image_only=True),
            T.EnsureChannelFirstd(keys="image"),
            T.Orientationd(keys="image", axcodes="LPS"),
            T.Resized(keys="image", spatial_size=VOLUME_SIZE[::-1], mode="trilinear"),
            T.ScaleIntensityRanged(keys="image", a_min=-1000.0, a_max=1000.0, b_min=0.0, b_max=1.0, clip=True),
            T.EnsureTyped(keys="image", dtype=dtype),
        ]
    )


def keep_examples(examples: list) -> list:
    """collate_fn for one volume per item: deliver the examples as the dataset made them."""
    return examples


def delivered_volumes(batch) -> list[torch.Tensor]:
    """The `pixel_values` (or MONAI `image`) tensors of one DataLoader batch, one per volume or one per batch."""
    if isinstance(batch, dict):  # a collator's batch
        return [batch["pixel_values"]]
    value = batch[0].get("pixel_values", batch[0].get("image"))
    return [value.as_tensor() if hasattr(value, "as_tensor") else value]


def time_epochs(dataset, epochs: int, workers: int, batch_size: int = 1, collate_fn=keep_examples) -> tuple:
    """Median seconds per epoch after one warm-up epoch, volumes and bytes of `pixel_values` delivered per epoch.
    The consumer copies every delivered volume once into a reused staging buffer."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        shuffle=False,
        collate_fn=collate_fn,
        persistent_workers=workers > 0,
    )
    staging: dict[tuple, torch.Tensor] = {}
    seconds, volumes, delivered = [], 0, 0
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        count, nbytes = 0, 0
        for batch in loader:
            for value in delivered_volumes(batch):
                buffer = staging.get((value.shape, value.dtype))
                if buffer is None:  # allocated and touched once, as a pinned-memory pool is
                    buffer = staging[(value.shape, value.dtype)] = torch.zeros(value.shape, dtype=value.dtype)
                buffer.copy_(value)
                count += value.shape[0] if value.ndim == 5 else 1
                nbytes += value.numel() * value.element_size()
        if epoch:  # epoch 0 warms caches, workers and the page cache
            seconds.append(time.perf_counter() - start)
            volumes, delivered = count, nbytes
    return statistics.median(seconds), volumes, delivered


def pixel_values_extent(entry: Path) -> tuple[int, list[int], torch.dtype]:
    """Byte offset, shape and dtype of `pixel_values` in a safetensors cache entry."""
    with open(entry, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    spec = header["pixel_values"]
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[spec["dtype"]]
    return 8 + size + spec["data_offsets"][0], spec["shape"], dtype


def page_cache_read_limit(entries: list[Path], epochs: int) -> dict[str, float]:
    """Volumes/s of one core reading `pixel_values` of each entry from the page cache into (i) one reused buffer,
    (ii) a new tensor each time, (iii) new shared memory each time."""
    extents = [pixel_values_extent(entry) for entry in entries]
    reused = {}

    def into_reused(shape, dtype):
        if (tuple(shape), dtype) not in reused:
            reused[tuple(shape), dtype] = torch.zeros(shape, dtype=dtype)
        return reused[tuple(shape), dtype]

    def into_new(shape, dtype):
        return torch.empty(shape, dtype=dtype)

    def into_shared(shape, dtype):
        storage = torch.UntypedStorage._new_shared(torch.Size(shape).numel() * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)

    results = {}
    for name, allocate in (
        ("reused buffer", into_reused),
        ("new tensor", into_new),
        ("new shared memory", into_shared),
    ):
        seconds = []
        for epoch in range(epochs + 1):
            start = time.perf_counter()
            for entry, (offset, shape, dtype) in zip(entries, extents):
                target = allocate(shape, dtype)
                fd = os.open(entry, os.O_RDONLY)
                try:
                    os.preadv(fd, [memoryview(target.view(torch.uint8).numpy()).cast("B")], offset)
                finally:
                    os.close(fd)
                del target
            if epoch:
                seconds.append(time.perf_counter() - start)
        results[name] = len(entries) / statistics.median(seconds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=8, help="training patients to generate (≈1.3 volumes each)")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 512, 512], help="generated volume D H W")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up epoch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="batch size of the collator path (b')")
    parser.add_argument("--skip-uncached", action="store_true", help="leave out the slow (a) paths")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the cohort and caches here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per process: the workers and the main process share the machine's cores

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rect_loader_bench_"))
    cohort = workdir / "cohort"
    if not (cohort / "dataset").exists():
        start = time.perf_counter()
        generate_cohort(cohort, n_train=args.volumes, n_val=0, seed=0, shape=tuple(args.shape))
        print(f"generated cohort in {time.perf_counter() - start:.1f} s")
    rows = read_ct_rate(cohort, "train", anatomy_masks=False, cot=False)
    load = os.getloadavg()
    print(
        f"{len(rows)} volumes of {tuple(args.shape)} voxels → processed to {tuple(VOLUME_SIZE)}, "
        f"{args.workers} workers, median of {args.epochs} epochs after a warm-up epoch; "
        f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    image_processor = ReCTImageProcessor(volume_size=VOLUME_SIZE, windows=["wide"])

    results = {}
    if not args.skip_uncached:
        results["(a) decode every epoch (nibabel + processor)"] = time_epochs(
            UncachedDataset(rows, image_processor, "nibabel"), args.epochs, args.workers
        )
        results["(a') decode every epoch (ReCT reader + processor)"] = time_epochs(
            UncachedDataset(rows, image_processor, "rect"), args.epochs, args.workers
        )
    limits = {}
    for dtype in ("float32", "float16"):
        cache = VolumeCache(workdir / f"rect_cache_{dtype}", image_processor, storage_dtype=dtype)
        dataset = CachedVolumeDataset(rows, cache, label_indices=[2])
        dataset.prepare(progress=False)
        limits[dtype] = page_cache_read_limit(sorted(cache.root.rglob("*.safetensors")), args.epochs)
        results[f"(b) ours, VolumeCache {dtype}"] = time_epochs(dataset, args.epochs, args.workers)
        results[f"(b') ours, {dtype}, collator batches of {args.batch_size}"] = time_epochs(
            dataset, args.epochs, args.workers, args.batch_size, ClassificationCollator()
        )

    from monai.data import CacheDataset, PersistentDataset

    items = [{"image": row["volume_path"]} for row in rows]
    for dtype in (torch.float32, torch.float16):
        persistent_dir = workdir / f"monai_persistent_{dtype}"
        shutil.rmtree(persistent_dir, ignore_errors=True)
        results[f"(c) MONAI PersistentDataset {str(dtype)[6:]}"] = time_epochs(
            PersistentDataset(items, monai_transforms(dtype), cache_dir=persistent_dir), args.epochs, args.workers
        )
    results["(c) MONAI CacheDataset (RAM) float32"] = time_epochs(
        CacheDataset(items, monai_transforms(torch.float32), num_workers=args.workers, progress=False),
        args.epochs,
        args.workers,
    )

    rates = {name: volumes / seconds for name, (seconds, volumes, _) in results.items()}
    monai = rates["(c) MONAI PersistentDataset float32"]
    baseline = rates.get("(a) decode every epoch (nibabel + processor)")
    print(f"\n{'path':52s} {'vol/s':>8s} {'MB/s':>9s} {'× uncached':>11s} {'× MONAI Pers.':>14s}")
    for name, (seconds, _, nbytes) in results.items():
        versus = f"{rates[name] / baseline:11.2f}" if baseline else f"{'-':>11s}"
        print(f"{name:52s} {rates[name]:8.2f} {nbytes / seconds / 1e6:9.1f} {versus} {rates[name] / monai:14.2f}")
    print("\npage-cache read limit, one core, no workers (vol/s):")
    for dtype, limit in limits.items():
        print(f"  {dtype:8s} " + ", ".join(f"into a {name} {rate:.1f}" for name, rate in limit.items()))
    ours = rates["(b) ours, VolumeCache float16"]
    print(
        f"\nours (float16, one volume per item): {ours:.1f} vol/s = {ours / monai:.1f}× MONAI PersistentDataset "
        f"float32, {ours / rates['(c) MONAI PersistentDataset float16']:.1f}× its float16 variant; "
        f"{ours / limits['float16']['reused buffer']:.0%} of one core's page-cache read into a reused buffer"
    )
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
