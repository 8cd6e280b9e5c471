"""Inference latency and peak memory of the localizer per volume, against its vision encoder alone.

The model is `trainers/recipes/localization.yaml`'s ReCTForLesionLocalization (vision hidden 768, 12 heads, the
default `ReCTLocalizerConfig`: fusion width 128, decoder channels 64/32/16/16, a BERT-base text tower) in eval
mode under `torch.no_grad()`, on a random volume with one text prompt and a box. Each measurement runs in its own
process so that each peak is its own: on CUDA `torch.cuda.max_memory_allocated`, on the CPU the growth of the
process's peak resident memory over what it held once the model was built (`ru_maxrss`). Printed per size:
seconds per volume (median of the timed runs after one warm-up), peak memory, and the localizer / encoder ratios.

The recipe's 12 layers at 64×512×512 need a GPU; on this machine's CPUs the defaults keep the recipe's width and
use 2 encoder layers at 32×128×128 and 64×256×256 (`--layers 12 --sizes 64x512x512` for the real geometry on a GPU).

Usage: python bench/localize.py [--layers 2] [--sizes 32x128x128 64x256x256] [--prompts 1] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import sys

from _measure import REPO_ROOT, run_child, timed_peak


sys.path.insert(0, str(REPO_ROOT))


def one_measurement(size: list[int], layers: int, prompts: int, runs: int, part: str) -> dict:
    """Build the model, time `runs` forwards of `part` ("encoder" or "localizer") after a warm-up (child process)."""
    import torch

    from hf_models import ReCTConfig, ReCTForLesionLocalization
    from trainers.recipes import load_recipe

    config = dict(load_recipe("localization").model.config)
    vision = dict(config.get("vision_config", {}), volume_size=size, num_hidden_layers=layers)
    text = dict(config.get("text_config") or {}, num_hidden_layers=min(layers, 12))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = ReCTForLesionLocalization(ReCTConfig(**{**config, "vision_config": vision, "text_config": text}))
    model = model.to(device).eval()
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
    parser.add_argument("--prompts", type=int, default=1, help="text prompts per volume (K masks)")
    parser.add_argument("--runs", type=int, default=3, help="timed forwards per measurement (after one warm-up)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(one_measurement(**json.loads(args.child))))
        return 0

    for text_size in args.sizes:
        size = [int(v) for v in text_size.lower().split("x")]
        result = {}
        for part in ("encoder", "localizer"):
            spec = dict(size=size, layers=args.layers, prompts=args.prompts, runs=args.runs, part=part)
            result[part] = run_child(__file__, spec)
        enc, loc = result["encoder"], result["localizer"]
        print(
            f"{text_size:>12}: encoder {enc['seconds']:7.3f} s/volume, peak {enc['peak_mib']:7.0f} MiB | localizer "
            f"({args.prompts} prompt(s) + box) {loc['seconds']:7.3f} s/volume, peak {loc['peak_mib']:7.0f} MiB | "
            f"localizer/encoder: time {loc['seconds'] / enc['seconds']:.2f}x, "
            f"memory {loc['peak_mib'] / max(enc['peak_mib'], 1e-9):.2f}x",
            flush=True,
        )
    print(f"device: {loc['device']}; {args.layers} encoder layers, hidden 768 (localization recipe)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
