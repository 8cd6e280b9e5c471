"""Random augmentation of processed CT examples (SPEC §6): flips, small rotations about z, intensity shift and
scale, Gaussian noise — applied identically to the volume and its masks.

Transforms take and return an example dict, as MONAI's dictionary transforms (`RandFlipd`, `RandRotated`, …) do:

    {"pixel_values": (C, D, H, W) float tensor, "anatomy_mask": (1, D, H, W) int tensor or None,
     "lesion_mask": (1, D, H, W) int tensor or None, ...}

The tensors are the image processor's output: canonical LPS+ layout, `(D, H, W)` = (inferior→superior,
anterior→posterior, patient right→left), windowed (and optionally normalised) channels. Geometric transforms move
the image with trilinear/bilinear interpolation and every mask with nearest-neighbour lookup (ids are never
interpolated), so a mask stays on the voxels of the structure it labels; intensity transforms touch the image only.
Keys whose value is absent or None are skipped, so one pipeline serves examples with and without masks.

Randomness: each transform owns a `torch.Generator`, seeded by `seed` (`Compose` derives its children's seeds from
its own), so a run is reproducible. Inside `DataLoader` workers the generator is re-seeded from the worker's seed
(`torch.utils.data.get_worker_info().seed`, drawn from the loader's own generator): workers never repeat each
other's draws, and a seeded loader still gives the same augmentations on every run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F


__all__ = [
    "Compose",
    "RandFlipd",
    "RandGaussianNoised",
    "RandRotateZd",
    "RandScaleIntensityd",
    "RandShiftIntensityd",
    "RandomizableTransform",
    "ct_augmentation",
]

IMAGE_KEYS = ("pixel_values",)
MASK_KEYS = ("anatomy_mask", "lesion_mask")


def _check_probability(name: str, prob: float) -> float:
    if not 0.0 <= float(prob) <= 1.0:
        raise ValueError(f"{name}: `prob` must be in [0, 1], got {prob!r}")
    return float(prob)


def _check_volume(key: str, value: torch.Tensor, transform: str) -> None:
    if not isinstance(value, torch.Tensor) or value.ndim != 4:
        found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{transform}: `{key}` must be a (channels, depth, height, width) tensor, got {found}")


class RandomizableTransform:
    """Base of the random transforms: a seeded `torch.Generator` that DataLoader workers re-seed for themselves.

    Args:
        prob: probability that the transform is applied to an example (0 = always the identity).
        seed: seed of the transform's generator.
    """

    def __init__(self, prob: float, seed: int = 0):
        self.prob = _check_probability(type(self).__name__, prob)
        self.set_random_state(seed)

    def set_random_state(self, seed: int) -> RandomizableTransform:
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._worker_seed: int | None = None
        return self

    def _rng(self) -> torch.Generator:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            # A worker holds a copy of the parent's generator: without this every worker would draw the same
            # numbers. The worker seed changes with each epoch's iterator, and is fixed by the loader's generator.
            self._worker_seed = info.seed
            self.generator = torch.Generator().manual_seed((self.seed * 1_000_003 + info.seed) % (2**63))
        return self.generator

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self._rng()))

    def triggered(self) -> bool:
        """Draw whether to apply the transform (always one draw, so the stream does not depend on `prob`)."""
        return float(torch.rand((), generator=self._rng())) < self.prob

    def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = {k: v for k, v in vars(self).items() if k not in ("generator", "_worker_seed")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


class RandFlipd(RandomizableTransform):
    """Flip the volume and its masks along one spatial axis with probability `prob`.

    Args:
        spatial_axis: axis of `(D, H, W)`: 0 = superior–inferior, 1 = anterior–posterior, 2 = patient left–right
            (the default: a left–right mirror keeps a plausible chest; none of the 18 CT-RATE labels is lateral,
            but a lateral label (e.g. "left pleural effusion") would have to be swapped with its partner here).
        prob: probability of flipping.
        image_keys, mask_keys: keys of the volumes and of the masks to flip.
        seed: generator seed.
    """

    def __init__(
        self,
        spatial_axis: int = 2,
        prob: float = 0.5,
        image_keys: Sequence[str] = IMAGE_KEYS,
        mask_keys: Sequence[str] = MASK_KEYS,
        seed: int = 0,
    ):
        if spatial_axis not in (0, 1, 2):
            raise ValueError(f"RandFlipd: `spatial_axis` must be 0 (D), 1 (H) or 2 (W), got {spatial_axis!r}")
        self.spatial_axis = spatial_axis
        self.keys = tuple(image_keys) + tuple(mask_keys)
        super().__init__(prob, seed)

    def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(example)
        if not self.triggered():
            return out
        for key in self.keys:
            if out.get(key) is not None:
                _check_volume(key, out[key], "RandFlipd")
                out[key] = torch.flip(out[key], dims=(1 + self.spatial_axis,))
        return out


class RandRotateZd(RandomizableTransform):
    """Rotate the volume and its masks about the z (superior–inferior) axis by an angle drawn uniformly from
    `[-max_degrees, max_degrees]`, with probability `prob`.

    Every axial slice is rotated about its centre in voxel units (in-plane voxels are assumed square, as the
    processor's isotropic in-plane resampling makes them). The image is resampled bilinearly, masks by nearest
    neighbour. Voxels rotated in from outside the field of view take the nearest edge value for the image (the
    processor pads with air, so the edge is air) and id 0 (background) for masks.

    Args:
        max_degrees: largest rotation in degrees (positive turns anterior towards the patient's left).
        prob: probability of rotating.
        image_keys, mask_keys: keys of the volumes and of the masks to rotate.
        seed: generator seed.
    """

    def __init__(
        self,
        max_degrees: float = 10.0,
        prob: float = 0.5,
        image_keys: Sequence[str] = IMAGE_KEYS,
        mask_keys: Sequence[str] = MASK_KEYS,
        seed: int = 0,
    ):
        if not 0.0 <= float(max_degrees) <= 180.0:
            raise ValueError(f"RandRotateZd: `max_degrees` must be in [0, 180], got {max_degrees!r}")
        self.max_degrees = float(max_degrees)
        self.image_keys = tuple(image_keys)
        self.mask_keys = tuple(mask_keys)
        super().__init__(prob, seed)

    @staticmethod
    def sampling_grid(height: int, width: int, degrees: float, dtype=torch.float32) -> torch.Tensor:
        """`(1, height, width, 2)` grid for `F.grid_sample` (align_corners=False) that rotates a slice about its
        centre by `degrees`, in voxel units (normalised coordinates would shear a non-square slice)."""
        angle = math.radians(degrees)
        cos, sin = math.cos(angle), math.sin(angle)
        # Output voxel (x, y) samples the input at R^-1 (x, y); in normalised units x_n = x / (W / 2), so the
        # voxel-space rotation becomes S^-1 R^-1 S with S = diag(W / 2, H / 2).
        sx, sy = width / 2.0, height / 2.0
        theta = torch.tensor(
            [[cos, sin * sy / sx, 0.0], [-sin * sx / sy, cos, 0.0]],
            dtype=dtype,
        )[None]
        return F.affine_grid(theta, [1, 1, height, width], align_corners=False)

    def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(example)
        degrees = self.uniform(-self.max_degrees, self.max_degrees)  # drawn always: a stream independent of prob
        if not self.triggered() or degrees == 0.0:
            return out
        grid = None
        for key in self.image_keys + self.mask_keys:
            value = out.get(key)
            if value is None:
                continue
            _check_volume(key, value, "RandRotateZd")
            channels, depth, height, width = value.shape
            if grid is None:
                grid = self.sampling_grid(height, width, degrees)
            is_mask = key in self.mask_keys
            # (C, D, H, W) → (D, C, H, W): the rotation is the same for every slice, so slices form the batch.
            slices = value.permute(1, 0, 2, 3).to(torch.float32)
            rotated = F.grid_sample(
                slices,
                grid.expand(depth, -1, -1, -1),
                mode="nearest" if is_mask else "bilinear",
                padding_mode="zeros" if is_mask else "border",
                align_corners=False,
            )
            rotated = rotated.permute(1, 0, 2, 3).contiguous()
            out[key] = rotated.round().to(value.dtype) if is_mask else rotated.to(value.dtype)
        return out


class _ChannelIntensityTransform(RandomizableTransform):
    """An intensity change with one random draw per channel (or one for the whole image), applied to the image keys.

    Subclasses give `draw(count)` → `(count,)` values and `apply(value, drawn)` with `drawn` shaped `(C|1, 1, 1, 1)`.
    """

    def __init__(self, prob: float, channel_wise: bool, image_keys: Sequence[str], seed: int):
        self.channel_wise = bool(channel_wise)
        self.image_keys = tuple(image_keys)
        super().__init__(prob, seed)

    def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(example)
        if not self.triggered():
            return out
        for key in self.image_keys:
            value = out.get(key)
            if value is None:
                continue
            _check_volume(key, value, type(self).__name__)
            drawn = self.draw(value.shape[0] if self.channel_wise else 1)
            out[key] = self.apply(value, drawn.to(value.dtype).view(-1, 1, 1, 1))
        return out


class RandShiftIntensityd(_ChannelIntensityTransform):
    """Add one offset drawn uniformly from `[-offsets, offsets]` to the image (per channel if `channel_wise`).

    Offsets are in the units of `pixel_values` (a windowed [0, 1] channel, or its normalised form): 0.05 on a
    lung window (1500 HU wide) is 75 HU.
    """

    def __init__(
        self,
        offsets: float = 0.05,
        prob: float = 0.5,
        channel_wise: bool = True,
        image_keys: Sequence[str] = IMAGE_KEYS,
        seed: int = 0,
    ):
        if offsets < 0:
            raise ValueError(f"RandShiftIntensityd: `offsets` must be >= 0, got {offsets!r}")
        self.offsets = float(offsets)
        super().__init__(prob, channel_wise, image_keys, seed)

    def draw(self, count: int) -> torch.Tensor:
        return (torch.rand(count, generator=self._rng()) * 2 - 1) * self.offsets

    def apply(self, value: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return value + shift


class RandScaleIntensityd(_ChannelIntensityTransform):
    """Multiply the image by `1 + f`, `f` drawn uniformly from `[-factors, factors]` (per channel if
    `channel_wise`), about each channel's mean so that scaling changes contrast, not brightness."""

    def __init__(
        self,
        factors: float = 0.1,
        prob: float = 0.5,
        channel_wise: bool = True,
        image_keys: Sequence[str] = IMAGE_KEYS,
        seed: int = 0,
    ):
        if not 0.0 <= factors < 1.0:
            raise ValueError(f"RandScaleIntensityd: `factors` must be in [0, 1), got {factors!r}")
        self.factors = float(factors)
        super().__init__(prob, channel_wise, image_keys, seed)

    def draw(self, count: int) -> torch.Tensor:
        return 1.0 + (torch.rand(count, generator=self._rng()) * 2 - 1) * self.factors

    def apply(self, value: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        mean = value.mean(dim=(1, 2, 3), keepdim=True)
        return (value - mean) * scale + mean


class RandGaussianNoised(RandomizableTransform):
    """Add zero-mean Gaussian noise of standard deviation `std` (in `pixel_values` units) to the image."""

    def __init__(self, std: float = 0.02, prob: float = 0.5, image_keys: Sequence[str] = IMAGE_KEYS, seed: int = 0):
        if std < 0:
            raise ValueError(f"RandGaussianNoised: `std` must be >= 0, got {std!r}")
        self.std = float(std)
        self.image_keys = tuple(image_keys)
        super().__init__(prob, seed)

    def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(example)
        if not self.triggered() or self.std == 0.0:
            return out
        for key in self.image_keys:
            value = out.get(key)
            if value is None:
                continue
            _check_volume(key, value, "RandGaussianNoised")
            noise = torch.randn(value.shape, generator=self._rng(), dtype=torch.float32) * self.std
            out[key] = value + noise.to(value.dtype)
        return out


class Compose:
    """Apply transforms in order; `seed` seeds each child from one generator (MONAI's `Compose.set_random_state`).

    Args:
        transforms: callables taking and returning an example dict.
        seed: when given, re-seeds every `RandomizableTransform` child with a seed derived from it.
    """

    def __init__(self, transforms: Sequence[Callable[[dict], dict]], seed: int | None = None):
        self.transforms = list(transforms)
        if seed is not None:
            self.set_random_state(seed)

    def set_random_state(self, seed: int) -> Compose:
        seeds = torch.randint(0, 2**62, (len(self.transforms),), generator=torch.Generator().manual_seed(int(seed)))
        for transform, child_seed in zip(self.transforms, seeds.tolist()):
            if hasattr(transform, "set_random_state"):
                transform.set_random_state(child_seed)
        return self

    def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(example)
        for transform in self.transforms:
            out = transform(out)
        return out

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(t) for t in self.transforms)
        return f"Compose([\n  {inner}\n])"


def ct_augmentation(
    strength: float = 1.0,
    seed: int = 0,
    flip_prob: float = 0.5,
    max_degrees: float = 10.0,
    shift: float = 0.05,
    scale: float = 0.1,
    noise_std: float = 0.03,
) -> Compose:
    """SPEC §6 augmentation for processed chest CT: left–right flip, rotation about z, intensity shift and scale,
    Gaussian noise. `strength` scales every magnitude and probability (0 gives the identity).

    Magnitudes are in `pixel_values` units (see `RandShiftIntensityd`) and degrees; each of the random transforms
    except the flip fires with probability `min(1, 0.5 * strength)`.
    """
    if strength < 0:
        raise ValueError(f"ct_augmentation: `strength` must be >= 0, got {strength!r}")
    prob = min(1.0, 0.5 * strength)
    return Compose(
        [
            RandFlipd(spatial_axis=2, prob=min(1.0, flip_prob * min(strength, 1.0))),
            RandRotateZd(max_degrees=min(180.0, max_degrees * strength), prob=prob),
            RandScaleIntensityd(factors=min(0.9, scale * strength), prob=prob),
            RandShiftIntensityd(offsets=shift * strength, prob=prob),
            RandGaussianNoised(std=noise_std * strength, prob=prob),
        ],
        seed=seed,
    )
