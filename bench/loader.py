"""Throughput of the training data path at seed size (64×512×512 after processing), 2 DataLoader workers.

(a) uncached: every epoch decodes each `.nii.gz` with nibabel and runs the full ReCTImageProcessor pipeline
    ((a') the same with the processor's own libdeflate/zlib reader);
(b) ours: `CachedVolumeDataset` over a warm `VolumeCache` (safetensors entries, memory-mapped reads);
(c) MONAI `PersistentDataset` (warm disk cache of torch-pickled tensors) and `CacheDataset` (in-RAM) with the
    equivalent transforms (LoadImage, EnsureChannelFirst, Orientation LPS, Resize, ScaleIntensityRange).
All on the same phantom cohort (`rect-vlm synth`). Reports volumes/s and MB/s of delivered `pixel_values`,
median over timed epochs after one warm-up epoch, and ratios against (a).

Usage: python bench/loader.py [--volumes 8] [--shape 96 512 512] [--epochs 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hf_models import ReCTImageProcessor
from trainers.data.cache import VolumeCache
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


def monai_transforms():
    from monai import transforms as T

    return T.Compose(
        [
            T.LoadImaged(keys="image", image_only=True),
            T.EnsureChannelFirstd(keys="image"),
            T.Orientationd(keys="image", axcodes="LPS"),
            T.Resized(keys="image", spatial_size=VOLUME_SIZE[::-1], mode="trilinear"),
            T.ScaleIntensityRanged(keys="image", a_min=-1000.0, a_max=1000.0, b_min=0.0, b_max=1.0, clip=True),
        ]
    )


def time_epochs(dataset, epochs: int, workers: int, key: str) -> tuple[float, float]:
    """Median seconds per epoch after one warm-up epoch, and bytes delivered per epoch."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=1,
        num_workers=workers,
        shuffle=False,
        collate_fn=lambda batch: batch,
        persistent_workers=workers > 0,
    )
    seconds, delivered = [], 0
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        nbytes = 0
        for batch in loader:
            value = batch[0][key] if isinstance(batch[0], dict) else batch[0]
            nbytes += value.numel() * value.element_size()
        if epoch:  # epoch 0 warms caches, workers and the page cache
            seconds.append(time.perf_counter() - start)
            delivered = nbytes
    return statistics.median(seconds), delivered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=8, help="training patients to generate (≈1.3 volumes each)")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 512, 512], help="generated volume D H W")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up epoch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the cohort and caches here")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rect_loader_bench_"))
    cohort = workdir / "cohort"
    if not (cohort / "dataset").exists():
        start = time.perf_counter()
        generate_cohort(cohort, n_train=args.volumes, n_val=0, seed=0, shape=tuple(args.shape))
        print(f"generated cohort in {time.perf_counter() - start:.1f} s")
    rows = read_ct_rate(cohort, "train", anatomy_masks=False, cot=False)
    print(
        f"{len(rows)} volumes of {tuple(args.shape)} voxels → processed to {tuple(VOLUME_SIZE)}, "
        f"{args.workers} workers, median of {args.epochs} epochs after a warm-up epoch"
    )
    image_processor = ReCTImageProcessor(volume_size=VOLUME_SIZE, windows=["wide"])

    results = {}
    results["(a) decode every epoch (nibabel + processor)"] = time_epochs(
        UncachedDataset(rows, image_processor, "nibabel"), args.epochs, args.workers, "pixel_values"
    )
    results["(a') decode every epoch (ReCT reader + processor)"] = time_epochs(
        UncachedDataset(rows, image_processor, "rect"), args.epochs, args.workers, "pixel_values"
    )
    for dtype in ("float32", "float16"):
        cache = VolumeCache(workdir / f"rect_cache_{dtype}", image_processor, storage_dtype=dtype)
        results[f"(b) ours, VolumeCache {dtype}"] = time_epochs(
            CachedVolumeDataset(rows, cache), args.epochs, args.workers, "pixel_values"
        )

    from monai.data import CacheDataset, PersistentDataset

    items = [{"image": row["volume_path"]} for row in rows]
    persistent_dir = workdir / "monai_persistent"
    shutil.rmtree(persistent_dir, ignore_errors=True)
    results["(c) MONAI PersistentDataset"] = time_epochs(
        PersistentDataset(items, monai_transforms(), cache_dir=persistent_dir), args.epochs, args.workers, "image"
    )
    results["(c) MONAI CacheDataset (RAM)"] = time_epochs(
        CacheDataset(items, monai_transforms(), num_workers=args.workers, progress=False),
        args.epochs,
        args.workers,
        "image",
    )

    baseline = results["(a) decode every epoch (nibabel + processor)"][0]
    ours = results["(b) ours, VolumeCache float32"][0]
    print(f"\n{'path':52s} {'vol/s':>8s} {'MB/s':>9s} {'× uncached':>11s} {'ours-f32 ×':>11s}")
    for name, (seconds, nbytes) in results.items():
        print(
            f"{name:52s} {len(rows) / seconds:8.2f} {nbytes / seconds / 1e6:9.1f} "
            f"{baseline / seconds:11.2f} {seconds / ours:11.2f}"
        )
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
