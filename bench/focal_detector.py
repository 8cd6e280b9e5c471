"""Can the focal findings be detected at the demo's grid at all? A dedicated voxel detector, trained on crops.

The demo's classifier leaves the focal findings (lung nodule, medical material, calcifications, bronchiectasis,
atelectasis, fibrotic sequela) near chance on held-out scans, and its lesion map does not find them even on its
training volumes (`bench/encoder_probe.py`). This bench asks whether the demo's volumes hold what it takes to find
them: on the demo cohort (`DEMO_COHORT`, in `--workdir`, shared with `bench/learning.py`), read through the demo
recipe's image processor and cache (32×64×64, its four HU windows), it trains a small fully convolutional 3D
detector at the full voxel grid — five 3×3×3 convolutions, two of them dilated (receptive field 15 voxels), one
logit map per finding in `--findings` — on crops of `--crop` voxels. Half of each batch is centred on a lesion
voxel of a finding (chosen uniformly among `--findings`, jittered by up to 4 voxels), half lies anywhere, so the
detector sees the lesions as often as the vessels, bones and wires that look like them. Loss: per-voxel BCE
(positive weight 10) plus a soft Dice per finding; a left-right flip as augmentation.

Each held-out volume is then scored whole, per finding, by its map's maximum probability and by the mean of its 20
highest (`top20`), and the scan-level AUROC is printed per seed, with the median over seeds and the untrained
detector (the same seed, as initialised) as the baseline; so is the per-voxel AUROC on the held-out volumes that
have the finding (how well the map outlines it), and the training time. Several `--findings` share one detector
(and its steps); run one finding at a time to give each the whole budget.

Usage: python bench/focal_detector.py [--findings "Lung nodule" ...] [--seeds 0 1 2] [--steps 1500]
                                      [--train-volumes 700] [--workdir DIR] [--width 32] [--crop 16 32 32]
"""

# ruff: noqa: E402 - `short_openmp_spin` must run before torch (imported further down) loads libgomp.
from __future__ import annotations

from trainers.cli import short_openmp_spin


short_openmp_spin()  # as `rect-vlm` does

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from trainers.classification import ClassifierRecipe
from trainers.data.cache import VolumeCache
from trainers.data.phantom import LESION_IDS
from trainers.data.readers import read_ct_rate
from trainers.data.volume_dataset import CachedVolumeDataset
from trainers.demo import demo_cohort_parameters, prepare_cohort


#: The findings the demo's classifier leaves near chance at its grid (README, "Learning on the phantom cohort").
FOCAL_FINDINGS = (
    "Lung nodule",
    "Medical material",
    "Arterial wall calcification",
    "Coronary artery wall calcification",
    "Bronchiectasis",
    "Atelectasis",
    "Pulmonary fibrotic sequela",
)


class FocalDetector(nn.Module):
    """Fully convolutional 3D detector at the input's voxel grid: five 3×3×3 convolutions (GELU; the third and
    fourth dilated by 2, so each output voxel sees 15 voxels along every axis) and a 1×1×1 head, one logit map per
    finding."""

    def __init__(self, in_channels: int, width: int, num_findings: int):
        super().__init__()
        layers, channels = [], in_channels
        for dilation in (1, 1, 2, 2, 1):
            layers += [nn.Conv3d(channels, width, 3, padding=dilation, dilation=dilation), nn.GELU()]
            channels = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv3d(width, num_findings, 1)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(volumes))


def load_split(dataset: CachedVolumeDataset, finding_ids: list[int]) -> list[tuple[torch.Tensor, np.ndarray, list]]:
    """Per volume: `pixel_values (C, D, H, W)` float16, the findings' masks `(K, D, H, W)` bool and its labels."""
    volumes = []
    for index in range(len(dataset)):
        example = dataset[index]
        lesion = np.asarray(example["lesion_mask"])[0]
        masks = np.stack([lesion == i for i in finding_ids])
        pixels = example["pixel_values"].to(torch.float16, copy=True)  # off the cache's memory map
        volumes.append((pixels, masks, example["labels"].tolist()))
    return volumes


def sample_batch(rng: np.random.Generator, volumes, positives: list[list[int]], crop, batch: int):
    """`batch` crops of `crop` voxels: the first half centred (±4 voxels) on a lesion voxel of a finding drawn
    uniformly among those with training positives, the rest anywhere; each flipped left-right with probability ½.
    → pixel crops `(batch, C, *crop)` float32 and mask crops `(batch, K, *crop)` float32."""
    shape = volumes[0][0].shape[1:]
    with_positives = [k for k, indices in enumerate(positives) if indices]
    pixels, masks = [], []
    for b in range(batch):
        if b < batch // 2 and with_positives:
            k = with_positives[rng.integers(len(with_positives))]
            index = positives[k][rng.integers(len(positives[k]))]
            voxels = np.argwhere(volumes[index][1][k])
            centre = voxels[rng.integers(len(voxels))] + rng.integers(-4, 5, size=3)
        else:
            index = int(rng.integers(len(volumes)))
            centre = [rng.integers(n) for n in shape]
        start = [int(np.clip(c - k // 2, 0, n - k)) for c, k, n in zip(centre, crop, shape)]
        window = tuple(slice(s, s + k) for s, k in zip(start, crop))
        x = volumes[index][0][(slice(None), *window)].float()
        m = torch.from_numpy(np.ascontiguousarray(volumes[index][1][(slice(None), *window)])).float()
        if rng.random() < 0.5:
            x, m = x.flip(-1), m.flip(-1)
        pixels.append(x)
        masks.append(m)
    return torch.stack(pixels), torch.stack(masks)


def detector_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-voxel BCE (positive weight 10) plus the soft Dice of each finding over the batch, averaged."""
    bce = F.binary_cross_entropy_with_logits(logits, masks, pos_weight=torch.tensor(10.0))
    p = torch.sigmoid(logits)
    dims = (0, 2, 3, 4)
    dice = (2 * (p * masks).sum(dims) + 1) / (p.sum(dims) + masks.sum(dims) + 1)
    return bce + (1 - dice).mean()


@torch.no_grad()
def score(detector: FocalDetector, volumes, names: list[str]) -> dict[str, dict]:
    """Held-out scan AUROC per finding by the map's maximum and its top-20 mean, and the mean per-voxel AUROC over
    the volumes that have the finding."""
    detector.eval()
    maxima, top, voxel = [], [], [[] for _ in names]
    for pixels, masks, _ in volumes:
        p = torch.sigmoid(detector(pixels.float()[None]))[0].flatten(1)
        maxima.append(p.amax(1).numpy())
        top.append(p.topk(min(20, p.shape[1]), dim=1).values.mean(1).numpy())
        for k in range(len(names)):
            if masks[k].any() and not masks[k].all():
                voxel[k].append(roc_auc_score(masks[k].ravel(), p[k].numpy()))
    detector.train()
    labels = np.array([v[2] for v in volumes])
    maxima, top = np.array(maxima), np.array(top)
    result = {}
    for k, name in enumerate(names):
        y = labels[:, k]
        both = 0 < y.sum() < len(y)
        result[name] = {
            "max": float(roc_auc_score(y, maxima[:, k])) if both else None,
            "top20": float(roc_auc_score(y, top[:, k])) if both else None,
            "voxel": float(np.mean(voxel[k])) if voxel[k] else None,
        }
    return result


def train_detector(train, valid, names, *, seed: int, steps: int, width: int, crop, batch: int, lr: float = 1e-3):
    """Train one detector; → held-out scores as initialised and as trained, and the training seconds."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    detector = FocalDetector(train[0][0].shape[0], width, len(names))
    untrained = score(detector, valid, names)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=lr, weight_decay=1e-4)
    positives = [[i for i, v in enumerate(train) if v[1][k].any()] for k in range(len(names))]
    start = time.perf_counter()
    for step in range(steps):
        pixels, masks = sample_batch(rng, train, positives, crop, batch)
        loss = detector_loss(detector(pixels), masks)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"seed {seed}: the detector's loss is {loss.item()} at step {step}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0:
            print(f"    seed {seed} step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    return untrained, score(detector, valid, names), seconds


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _cell(value) -> str:
    return "   n/a" if value is None else f"{value:6.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--findings",
        nargs="+",
        default=["Lung nodule"],
        help=f"findings one detector learns (the focal ones: {', '.join(FOCAL_FINDINGS)})",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--train-volumes", type=int, default=700, help="training volumes held in memory")
    parser.add_argument("--width", type=int, default=32, help="channels of every convolution")
    parser.add_argument("--crop", type=int, nargs=3, default=[16, 32, 32], metavar=("D", "H", "W"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="keeps the cohort and the cache (bench/learning.py's)")
    args = parser.parse_args()
    unknown = [name for name in args.findings if name not in LESION_IDS]
    if unknown:
        parser.error(f"--findings {unknown}: not a phantom finding; expected names from {sorted(LESION_IDS)}")

    recipe = ClassifierRecipe()
    volume_size = recipe.volume_size
    if any(c > v for c, v in zip(args.crop, volume_size)):
        parser.error(f"--crop {args.crop}: larger than the demo's volumes {list(volume_size)}")

    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "rect_bench_learning").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cohort = workdir / "cohort"
    stamp = prepare_cohort(cohort, demo_cohort_parameters(), progress=True)
    cache = VolumeCache(workdir / "cache", recipe.image_processor())
    indices = ClassifierRecipe(label_names=tuple(args.findings)).label_indices()
    splits = {}
    for split, limit in (("train", args.train_volumes), ("valid", None)):
        rows = read_ct_rate(cohort, split, cot=False, lesion_masks=True)
        rows = rows.select(range(min(limit, len(rows)))) if limit else rows
        dataset = CachedVolumeDataset(rows, cache, label_indices=indices, lesion_column="lesion_mask_path")
        dataset.prepare(progress=True)
        splits[split] = load_split(dataset, [LESION_IDS[name] for name in args.findings])
    train, valid = splits["train"], splits["valid"]
    print(
        f"cohort {cohort} ({stamp['volumes']} volumes): {len(train)} training and {len(valid)} held-out volumes of "
        f"{list(volume_size)}; detector width {args.width}, crops {args.crop} × {args.batch}, {args.steps} steps, "
        f"torch threads {torch.get_num_threads()}"
    )
    runs = {}
    for seed in args.seeds:
        untrained, trained, seconds = train_detector(
            train, valid, args.findings, seed=seed, steps=args.steps, width=args.width, crop=args.crop,
            batch=args.batch,
        )  # fmt: skip
        runs[seed] = {"untrained": untrained, "trained": trained, "train_seconds": round(seconds, 1)}
        print(f"  seed {seed}: {seconds:.0f} s")

    print(f"\nheld-out scan AUROC ({len(valid)} volumes), per seed, median, untrained (median)")
    for kind in ("max", "top20", "voxel"):
        print(f"{kind}:")
        for name in args.findings:
            trained = [runs[s]["trained"][name][kind] for s in args.seeds]
            untrained = [runs[s]["untrained"][name][kind] for s in args.seeds]
            cells = " ".join(_cell(v) for v in trained)
            print(f"  {name:36s} {cells}  median {_cell(_median(trained))}  untrained {_cell(_median(untrained))}")
    print(f"training s: {[runs[s]['train_seconds'] for s in args.seeds]}")
    out = workdir / "focal_detector.json"
    out.write_text(json.dumps({"args": vars(args), "runs": {str(k): v for k, v in runs.items()}}, indent=1))
    print(f"results → {out}")


if __name__ == "__main__":
    main()
