"""Inference latency and peak memory of the localizer per volume, against its vision encoder alone.

The model is `trainers/recipes/localization.yaml`'s ReCTForLesionLocalization (vision hidden 768, 12 heads, the
default `ReCTLocalizerConfig`: fusion width 128, decoder channels 64/32/16/16, a BERT-base text tower) in eval
mode under `torch.no_grad()`, on a random volume with one text prompt and a box. Each measurement runs in its own
process so that each peak is its own: on CUDA `torch.cuda.max_memory_allocated`, on the CPU the growth of the
process's peak resident memory over what it held once the model was built (`ru_maxrss`). Printed per size:
seconds per volume (median of the timed runs after one warm-up), peak memory, and the localizer / encoder ratios;
on the CPU also the localizer with PyTorch's own choice of convolution kernel (`hf_models.modeling_rect.
_one_volume_runs_native_cpu_kernel` switched off in that process: one volume's 3D convolutions then run through
PyTorch's native im2col kernel wherever batch · channels · depth · height ≤ 20480) and the ratio to ours, which keeps
oneDNN for one volume (`ReCTConv3d`). `--sizes 32x64x64` with `--demo` is the demo's localizer (its encoder shape,
a MiniLM-sized text tower, decoder 64/32/16/8) with K = 16 prompts, as `bench/localization.py` asks it.

The recipe's 12 layers at 64×512×512 need a GPU; on this machine's CPUs the defaults keep the recipe's width and
use 2 encoder layers at 32×128×128 and 64×256×256 (`--layers 12 --sizes 64x512x512` for the real geometry on a GPU).

Usage: python bench/localize.py [--layers 2] [--sizes 32x128x128 64x256x256] [--prompts 1] [--runs 3] [--demo]
"""

from __future__ import annotations

import argparse
import json
import sys

from _measure import REPO_ROOT, run_child, timed_peak


sys.path.insert(0, str(REPO_ROOT))


def build_model(size: list[int], layers: int, demo: bool):
    """The localization recipe's model with `layers` encoder layers at `size`, or with `demo` the demo's localizer."""
    from hf_models import ReCTConfig, ReCTForLesionLocalization
    from trainers.recipes import load_recipe

    if demo:  # its shapes, with weights drawn at random (the timing does not depend on them)
        from transformers import AutoConfig

        from trainers.demo import demo_localization_recipe

        recipe = demo_localization_recipe(0)
        config = dict(
            recipe.model.config, text_config=AutoConfig.from_pretrained(recipe.model.text_pretrained).to_dict()
        )
        config["vision_config"] = dict(config["vision_config"], volume_size=size)
        return ReCTForLesionLocalization(ReCTConfig(**config))
    config = dict(load_recipe("localization").model.config)
    vision = dict(config.get("vision_config", {}), volume_size=size, num_hidden_layers=layers)
    text = dict(config.get("text_config") or {}, num_hidden_layers=min(layers, 12))
    return ReCTForLesionLocalization(ReCTConfig(**{**config, "vision_config": vision, "text_config": text}))


def one_measurement(size: list[int], layers: int, prompts: int, runs: int, part: str, demo: bool) -> dict:
    """Build the model, time `runs` forwards of `part` ("encoder", "localizer" or "localizer-torch-kernels": the
    localizer with PyTorch's own convolution kernels for one volume) after a warm-up (child process)."""
    import torch

    import hf_models.modeling_rect

    if part == "localizer-torch-kernels":
        hf_models.modeling_rect._one_volume_runs_native_cpu_kernel = lambda *args: False
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = build_model(size, layers, demo).to(device).eval()
    channels = model.config.vision_config.in_channels
    pixel_values = torch.rand(1, channels, *size, device=device)
    inputs = {
        "pixel_values": pixel_values,
        "input_ids": torch.randint(1000, 2000, (1, prompts, 8), device=device),
        "input_boxes": torch.tensor([[2.0, 10, 10, size[0] // 2, size[1] // 2, size[2] // 2]], device=device),
    }
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def forward() -> None:
        with torch.no_grad(), autocast:
            if part == "encoder":
                model.vision_model(pixel_values)
            else:
                model(**inputs)
        if cuda:
            torch.cuda.synchronize()

    return timed_peak(forward, runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="encoder layers (the recipe: 12)")
    parser.add_argument("--sizes", nargs="+", default=["32x128x128", "64x256x256"], help="volume sizes DxHxW")
    parser.add_argument(
        "--prompts", type=int, default=None, help="text prompts per volume (K masks; default 1, with --demo 16)"
    )
    parser.add_argument("--runs", type=int, default=3, help="timed forwards per measurement (after one warm-up)")
    parser.add_argument("--demo", action="store_true", help="the demo's localizer (K = 16 prompts unless --prompts)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prompts is None:
        args.prompts = 16 if args.demo else 1

    if args.child:
        print(json.dumps(one_measurement(**json.loads(args.child))))
        return 0

    for text_size in args.sizes:
        size = [int(v) for v in text_size.lower().split("x")]
        result = {}
        for part in ("encoder", "localizer", "localizer-torch-kernels"):
            if part == "localizer-torch-kernels" and not result["localizer"]["device"].startswith("CPU"):
                break  # the one-volume route concerns the CPU's kernels only
            spec = dict(size=size, layers=args.layers, prompts=args.prompts, runs=args.runs, part=part, demo=args.demo)
            result[part] = run_child(__file__, spec)
        enc, loc = result["encoder"], result["localizer"]
        print(
            f"{text_size:>12}: encoder {enc['seconds']:7.3f} s/volume, peak {enc['peak_mib']:7.0f} MiB | localizer "
            f"({args.prompts} prompt(s) + box) {loc['seconds']:7.3f} s/volume, peak {loc['peak_mib']:7.0f} MiB | "
            f"localizer/encoder: time {loc['seconds'] / enc['seconds']:.2f}x, "
            f"memory {loc['peak_mib'] / max(enc['peak_mib'], 1e-9):.2f}x",
            flush=True,
        )
        if "localizer-torch-kernels" in result:
            torch_kernels = result["localizer-torch-kernels"]
            print(
                f"{'':>12}  localizer with PyTorch's own kernels for one volume "
                f"{torch_kernels['seconds']:7.3f} s/volume, peak {torch_kernels['peak_mib']:7.0f} MiB | "
                f"PyTorch's / ours: time {torch_kernels['seconds'] / loc['seconds']:.2f}x",
                flush=True,
            )
    model = "the demo's localizer" if args.demo else f"{args.layers} encoder layers, hidden 768 (localization recipe)"
    print(f"device: {loc['device']}; {model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
