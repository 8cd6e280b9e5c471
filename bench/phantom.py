"""Phantom generator: seconds per volume, and how visible each finding is at the sizes a classifier sees.

Speed: `generate_cohort` at each `--speed-shapes` size (one scan per patient, default prevalence), wall and
process-CPU seconds per volume (CPU / wall shows how much the machine's other jobs slowed the run).

Visibility: for `--samples` patients per finding, the same patient, scan and reconstruction are rendered twice at
each `--shapes` size (D×H×W, generated natively at that size, as the demo does) with the finding and without it,
both without noise; the difference Δ (HU) is the finding's own signal, σ (HU) the noise of the same
reconstruction measured on the body. A voxel shows the finding when |Δ| ≥ max(3σ, 5 % of the width of the
finding's reading window: 75 HU in the lung window, 20 HU in the mediastinal one). Reported per finding and size:
the share of patients in which at least 3 voxels show it ("visible"), the median number of such voxels, and the
median peak contrast (the 99th percentile of |Δ| over the voxels that show it, HU: how bright or dark the finding
is against what it replaces, after partial volume and the kernel). This says the finding is in the image above
the noise; it does not say how easily it is told apart from normal anatomy (thick bronchial walls from normal
ones, a calcified plaque from contrast-filled blood): that is what a classifier has to learn.

    python bench/phantom.py                      # speed at 32x96x96, 48x128x128, 64x128x128; visibility
    python bench/phantom.py --samples 4 --shapes 32x64x64
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.data import phantom as P  # noqa: E402  (after the repository root is importable)
from trainers.data.phantom_anatomy import sample_anatomy  # noqa: E402
from trainers.data.phantom_appearance import (  # noqa: E402
    finish_hu,
    sample_geometry,
    sample_pose,
    sample_recon,
    sample_scan,
)
from trainers.data.phantom_canvas import FieldBank  # noqa: E402


#: 5 % of the reading window's width (lung: W 1500, mediastinum: W 400), in HU.
WINDOW_STEP = {"lung": 75.0, "mediastinum": 20.0}


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in text.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected DxHxW such as 32x96x96, got {text!r}")
    return parts


def speed(shape, patients: int, seed: int) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        cpu0, t0 = time.process_time(), time.perf_counter()
        summary = P.generate_cohort(tmp, patients, 0, seed=seed, shape=shape, p_prior=0.0, p_second_recon=0.0)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    n = summary["volumes"]
    return wall / n, cpu / n, n


def render_pair(name: str, shape, seed: int):
    """(Δ HU with − without the finding, noise σ in HU) for one patient."""
    rng = np.random.default_rng([seed, 17, P.LESION_IDS[name]])
    A = sample_anatomy(rng, emphysema=name == "Emphysema")
    F = P._assemble(rng, A, [P._initial_params(rng, A, [name])])[0]
    pose, scan = sample_pose(rng, A), sample_scan(rng, A, p_contrast=0.5)
    geom = sample_geometry(rng, A, shape, False, pose)
    recon = sample_recon(rng, A, scan, sharper=False)
    bank = FieldBank([seed, 17, P.LESION_IDS[name]])
    sigma = recon.noise_sigma
    images = {}
    for key, findings, noise in (("with", F, 0.0), ("without", {}, 0.0), ("noisy", F, sigma)):
        recon.noise_sigma = noise
        cv, _ = P.render_volume(A, findings, geom.grid, recon, bank)
        images[key] = finish_hu(cv, recon, geom, np.random.default_rng(seed)).astype(np.float32)
        if key == "with":
            body = cv.lab > 0
    noise = images["noisy"] - images["with"]
    return images["with"] - images["without"], float(noise[body].std())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--speed-shapes", type=parse_shape, nargs="*", default=[(32, 96, 96), (48, 128, 128), (64, 128, 128)]
    )
    parser.add_argument("--speed-patients", type=int, default=12)
    parser.add_argument("--shapes", type=parse_shape, nargs="*", default=[(32, 64, 64), (32, 96, 96), (48, 128, 128)])
    parser.add_argument("--samples", type=int, default=10, help="patients per finding and size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    for shape in args.speed_shapes:
        wall, cpu, n = speed(shape, args.speed_patients, args.seed)
        print(f"speed {'x'.join(map(str, shape)):>11}: {wall:.3f} s/volume wall, {cpu:.3f} s/volume CPU ({n} volumes)")

    if args.shapes:
        header = "finding".ljust(36) + "".join(f"{'x'.join(map(str, s)):>26}" for s in args.shapes)
        print("\nvisible share / median visible voxels / median peak |Δ| HU")
        print(header)
        for name in P.ABNORMALITIES:
            cells = []
            for shape in args.shapes:
                shown, counts, peaks = 0, [], []
                for i in range(args.samples):
                    delta, sigma = render_pair(name, shape, args.seed * 1000 + i)
                    strong = np.abs(delta) >= max(3.0 * sigma, WINDOW_STEP[P.FINDINGS[name].window])
                    counts.append(int(strong.sum()))
                    shown += int(strong.sum() >= 3)
                    peaks.append(float(np.percentile(np.abs(delta[strong]), 99)) if strong.any() else 0.0)
                cells.append(f"{shown / args.samples:>8.0%} {np.median(counts):>8.0f} {np.median(peaks):>8.0f}")
            print(name.ljust(36) + "".join(f"{c:>26}" for c in cells), flush=True)
    print(f"\npeak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
