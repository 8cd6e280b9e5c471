"""Benchmark: ReCTImageProcessor vs gzip inflate alone and the equivalent MONAI and TorchIO chains, on a chest CT.

Run:  .venv/bin/python bench/preprocess.py [--repeat N] [--out-dir DIR] [--threads T] [--skip monai torchio]

Generates a realistic 512x512x300 int16 chest phantom (body ellipse, lungs ~ -850 HU, heart, fat, spine and
ribs, noise), spacing 0.7 x 0.7 x 1.5 mm, stored as .nii.gz with an LPS-style RAS affine diag(-0.7, -0.7, 1.5)
(the layout ITK/dcm2niix write), then times, from the file on disk to the windowed array:

  read .nii.gz -> reorient to LPS (array (D, H, W) = (S, P, L)) -> trilinear resize to (64, 512, 512)
  -> "wide" window (0 +/- 1000 HU, clipped, scaled to [0, 1]) -> centre crop/pad to (64, 512, 512)

  isal inflate   read the file and inflate it with `isal.isal_zlib`, piece by piece, keeping nothing (the floor)
  zlib inflate   the same with the standard library's zlib (a machine without isal)
  ours           ReCTImageProcessor(volume_size=(64, 512, 512), windows=["wide"]): isal inflates slab by slab in a
                 background thread while finished slabs are resampled and windowed
  ours (whole)   the same, reading the whole file before processing (no overlap)
  ours (zlib)    streamed, with the zlib fallback (`volume_reading_rect.USE_ISAL = False`)
  MONAI          LoadImage, EnsureChannelFirst, Orientation("SPL"), Resize, ScaleIntensityRange, ResizeWithPadOrCrop
  TorchIO        ScalarImage, ToOrientation("LPS"), Resize, Clamp, RescaleIntensity, CropOrPad

Every chain is warmed up once, then all run round-robin --repeat times (so background load hits all alike); the
median wall time is reported, and ratios are taken between medians of the same run. Targets: ours >= 8x faster
than MONAI and <= 1.2x the isal inflate alone. The streamed, whole-file and zlib outputs must be bit-identical;
MONAI/TorchIO outputs are compared after putting them in the same (D, H, W) layout: mean/max absolute difference in
window units ([0, 1]). MONAI and TorchIO are bench-only dependencies (`pip install rect-vlm[bench]`), imported here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import hf_models.image_processing_rect as rect  # noqa: E402
import hf_models.volume_reading_rect as reading  # noqa: E402
from hf_models.image_processing_rect import ReCTImageProcessor  # noqa: E402


SHAPE_XYZ = (512, 512, 300)
SPACING_XYZ = (0.7, 0.7, 1.5)
OUT_DHW = (64, 512, 512)
WINDOW_HU = (-1000.0, 1000.0)  # "wide": center 0, width 2000
AGREEMENT_TOL = {"monai": 1e-4, "torchio": 0.02}  # mean |difference| in window units


def make_phantom(path: Path, seed: int = 0) -> None:
    """Write a chest-like int16 HU phantom as .nii.gz (array axes: x toward patient left, y posterior, z superior)."""
    import nibabel as nib

    nx, ny, nz = SHAPE_XYZ
    rng = np.random.default_rng(seed)
    # canonical (z, y, x) layout in memory; the NIfTI data array is its (x, y, z) transpose (Fortran order)
    volume = np.empty((nz, ny, nx), dtype=np.int16)
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    cx, cy = nx / 2.0, ny / 2.0
    rib_angle = np.arctan2(y - cy, x - cx)
    for z in range(nz):
        t = z / (nz - 1)
        scale = 0.88 + 0.12 * np.sin(np.pi * t)
        body = ((x - cx) / (215 * scale)) ** 2 + ((y - cy) / (150 * scale)) ** 2
        hu = np.full((ny, nx), -1000.0, dtype=np.float32)
        hu[body <= 1.0] = 40.0  # soft tissue
        hu[(body > 0.86) & (body <= 1.0)] = -100.0  # subcutaneous fat
        ribs = (body > 0.72) & (body <= 0.8) & (np.cos(14 * rib_angle) > 0.2)
        hu[ribs] = 600.0
        if 0.12 < t < 0.92:  # lungs, the heart sits anterior-left (patient left = +x index here)
            lung_scale = np.sin(np.pi * (t - 0.12) / 0.8) ** 0.5
            for side in (-1, 1):
                lung = ((x - cx - side * 95) / (70 * lung_scale + 1)) ** 2 + (
                    (y - cy + 5) / (105 * lung_scale + 1)
                ) ** 2
                hu[lung <= 1.0] = -850.0
            heart = ((x - cx - 35) / 70) ** 2 + ((y - cy + 45) / 60) ** 2
            if 0.3 < t < 0.7:
                hu[heart <= 1.0] = 45.0
        spine = ((x - cx) / 28) ** 2 + ((y - cy - 105) / 28) ** 2
        hu[spine <= 1.0] = 700.0
        hu += rng.standard_normal((ny, nx), dtype=np.float32) * 18.0
        volume[z] = np.clip(hu, -1024, 3071).astype(np.int16)
    affine = np.diag([-SPACING_XYZ[0], -SPACING_XYZ[1], SPACING_XYZ[2], 1.0])
    affine[:3, 3] = [nx * SPACING_XYZ[0] / 2, ny * SPACING_XYZ[1] / 2, -nz * SPACING_XYZ[2] / 2]
    image = nib.Nifti1Image(volume.transpose(2, 1, 0), affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def run_ours(path: Path, streamed: bool = True, isal: bool = True) -> np.ndarray:
    """Our processor on `path`; `streamed=False` reads the whole file first, `isal=False` inflates with zlib."""
    rect.STREAM_MIN_BYTES, reading.USE_ISAL = (8 << 20) if streamed else float("inf"), isal
    try:
        processor = ReCTImageProcessor(volume_size=OUT_DHW, windows=["wide"])
        return processor(str(path))["pixel_values"][0][0]  # (D, H, W) = (S, P, L)
    finally:
        rect.STREAM_MIN_BYTES, reading.USE_ISAL = 8 << 20, True


def inflate_alone(path: Path, backend) -> int:
    """Read the file and inflate it, keeping nothing: the least time any reader of this .nii.gz must spend.

    Fed in 512 KiB pieces as read: measured here, this is faster than one `decompress(whole_file)` call, which
    reads everything first and grows its output buffer by copying.
    """
    decompressor, size = backend.decompressobj(wbits=31), 0
    with open(path, "rb") as handle:
        while piece := handle.read(1 << 19):
            size += len(decompressor.decompress(piece))
    return size


def build_monai():
    from monai.transforms import (
        Compose,
        EnsureChannelFirst,
        LoadImage,
        Orientation,
        Resize,
        ResizeWithPadOrCrop,
        ScaleIntensityRange,
    )

    return Compose(
        [
            LoadImage(image_only=True, reader="NibabelReader"),
            EnsureChannelFirst(),
            Orientation(
                axcodes="SPL"
            ),  # MONAI codes name array axes: (S, P, L) = our (D, H, W) = LPS+ voxel orientation
            Resize(spatial_size=OUT_DHW, mode="trilinear"),
            ScaleIntensityRange(a_min=WINDOW_HU[0], a_max=WINDOW_HU[1], b_min=0.0, b_max=1.0, clip=True),
            ResizeWithPadOrCrop(spatial_size=OUT_DHW),
        ]
    )


def run_monai(chain, path: Path) -> np.ndarray:
    out = chain(str(path))
    return np.asarray(out.as_tensor()[0] if hasattr(out, "as_tensor") else out[0])


def build_torchio():
    import torchio as tio

    target_xyz = tuple(reversed(OUT_DHW))
    return tio.Compose(
        [
            tio.ToOrientation("LPS"),  # TorchIO axes are (x, y, z): L, P, S
            tio.Resize(target_xyz, image_interpolation="linear"),
            tio.Clamp(out_min=WINDOW_HU[0], out_max=WINDOW_HU[1]),
            tio.RescaleIntensity(out_min_max=(0.0, 1.0), in_min_max=WINDOW_HU),
            tio.CropOrPad(target_xyz),
        ]
    )


def run_torchio(chain, path: Path) -> np.ndarray:
    import torchio as tio

    image = chain(tio.ScalarImage(str(path)))
    return image.data[0].numpy().transpose(2, 1, 0)  # (x, y, z) = (L, P, S) -> (S, P, L)


def time_chains(chains: dict, repeat: int) -> tuple[dict, dict, dict]:
    """Warm every chain up once, then run them round-robin `repeat` times (so background load hits all alike)."""
    outputs = {name: fn() for name, fn in chains.items()}
    times = {name: [] for name in chains}
    for _ in range(repeat):
        for name, fn in chains.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, times, outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per chain (median reported)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write the phantom (default: a temp dir)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch / SimpleITK threads for every chain"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["monai", "torchio"], help="chains to skip")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    except ImportError:
        pass

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "chest_phantom_512x512x300.nii.gz"
        start = time.perf_counter()
        if not (args.out_dir and path.exists()):  # a phantom kept from an earlier run in --out-dir is reused
            make_phantom(path)
        print(
            f"phantom: {path} ({path.stat().st_size / 1e6:.1f} MB, {SHAPE_XYZ} int16, spacing {SPACING_XYZ} mm) "
            f"written in {time.perf_counter() - start:.1f} s"
        )
        print(
            f"geometry: LPS (S, P, L) -> trilinear resize {OUT_DHW} -> wide window -> crop/pad {OUT_DHW}; "
            f"threads={args.threads}, repeat={args.repeat}, torch {torch.__version__}"
        )

        from isal import isal_zlib

        chains = {
            "isal inflate": lambda: inflate_alone(path, isal_zlib),
            "zlib inflate": lambda: inflate_alone(path, zlib),
            "ours": lambda: run_ours(path),
            "ours (whole)": lambda: run_ours(path, streamed=False),
            "ours (zlib)": lambda: run_ours(path, isal=False),
        }
        if "monai" not in args.skip:
            monai_chain = build_monai()
            chains["monai"] = lambda: run_monai(monai_chain, path)
        if "torchio" not in args.skip:
            torchio_chain = build_torchio()
            chains["torchio"] = lambda: run_torchio(torchio_chain, path)
        results, times, outputs = time_chains(chains, args.repeat)
        notes = {
            "isal inflate": "read + isal_zlib inflate, output discarded",
            "zlib inflate": "read + zlib inflate, output discarded",
            "ours": "isal, inflating and processing overlapped slab by slab",
            "ours (whole)": "isal, whole file inflated before processing",
            "ours (zlib)": "stdlib zlib fallback, streamed",
        }
        for name, median in results.items():
            runs = [round(t, 3) for t in times[name]]
            print(f"{name:13s} median {median:7.3f} s  runs {runs}  {notes.get(name, '')}")

        ours = outputs["ours"]
        status = 0
        for name in ("ours (whole)", "ours (zlib)"):
            same = np.array_equal(outputs[name], ours)
            status |= 0 if same else 1
            print(f"{name} output bit-identical to ours: {same}")
        print("\nratio (chain / ours), agreement with ours in window units [0, 1]:")
        for name in ("monai", "torchio"):
            if name not in outputs:
                continue
            other = outputs[name]
            if other.shape != ours.shape:
                print(f"  {name}: output shape {other.shape} != ours {ours.shape}")
                status = 1
                continue
            diff = np.abs(other.astype(np.float32) - ours)
            ok = diff.mean() <= AGREEMENT_TOL[name]
            status |= 0 if ok else 1
            print(
                f"  {name:8s} {results[name] / results['ours']:5.2f}x slower | mean |diff| {diff.mean():.2e} "
                f"(tolerance {AGREEMENT_TOL[name]:g}: {'ok' if ok else 'FAILED'}), max |diff| {diff.max():.2e}, "
                f"99.9th pct {np.quantile(diff[::4, ::4, ::4], 0.999):.2e}"
            )

        def verdict(ok: bool) -> str:
            return "met" if ok else "NOT met"

        print("\ntargets (ratios of medians from this run):")
        floor = results["ours"] / results["isal inflate"]
        print(f"  ours / isal inflate alone      = {floor:5.2f}x  (target <= 1.2: {verdict(floor <= 1.2)})")
        whole = results["ours (whole)"] / results["isal inflate"]
        print(f"  ours (whole) / isal inflate    = {whole:5.2f}x  (what the overlap saves)")
        zlib_floor = results["ours (zlib)"] / results["zlib inflate"]
        print(f"  ours (zlib) / zlib inflate     = {zlib_floor:5.2f}x  (without isal)")
        if "monai" in results:
            speedup = results["monai"] / results["ours"]
            print(f"  MONAI / ours                   = {speedup:5.2f}x  (target >= 8: {verdict(speedup >= 8)})")
            zlib_speedup = results["monai"] / results["ours (zlib)"]
            print(f"  MONAI / ours (zlib)            = {zlib_speedup:5.2f}x  (without isal)")
        if "torchio" in results:
            print(f"  TorchIO / ours                 = {results['torchio'] / results['ours']:5.2f}x")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
