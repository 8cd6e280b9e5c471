"""Cost of slice-aware (divided) vs joint attention in the ReCT vision encoder.

1. Forward FLOPs of one encoder layer at the seed geometry — a (1, 1, 64, 512, 512) volume, patch (4, 16, 16),
   hidden 768, 12 heads → 16 × 32 × 32 = 16,384 patch tokens + CLS — counted with torch's FlopCounterMode on the
   meta device (no memory, no time; on real CPU tensors the fused SDPA kernels are invisible to the counter).
2. CPU wall time of one layer forward on reduced volumes (same hidden size and heads), median of repeats.

Usage: python bench/encoder.py [--repeats 3] [--threads N]
"""

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_models import ReCTVisionConfig
from hf_models.modeling_rect import ReCTLayer


SEED_VOLUME = (64, 512, 512)
PATCH = (4, 16, 16)


def layer_for(attention_type: str, volume_size, attn_implementation: str = "sdpa") -> tuple[ReCTLayer, tuple]:
    config = ReCTVisionConfig(
        volume_size=list(volume_size),
        patch_size=list(PATCH),
        attention_type=attention_type,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = attn_implementation
    grid = config.patch_grid
    return ReCTLayer(config).eval(), grid


def layer_flops(attention_type: str, attn_implementation: str) -> int:
    with torch.device("meta"):
        layer, grid = layer_for(attention_type, SEED_VOLUME, attn_implementation)
        tokens = torch.empty(1, 1 + grid[0] * grid[1] * grid[2], 768)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        layer(tokens, grid)
    return counter.get_total_flops()


def layer_seconds(attention_type: str, volume_size, repeats: int) -> float:
    torch.manual_seed(0)
    layer, grid = layer_for(attention_type, volume_size)
    tokens = torch.randn(1, 1 + grid[0] * grid[1] * grid[2], 768)
    times = []
    with torch.no_grad():
        layer(tokens, grid)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            layer(tokens, grid)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"== FLOPs per layer, seed geometry {SEED_VOLUME} patch {PATCH}, hidden 768, 12 heads (meta device) ==")
    for impl in ("sdpa", "eager"):
        joint = layer_flops("joint", impl)
        divided = layer_flops("divided", impl)
        print(
            f"[{impl:5s}] joint: {joint / 1e12:8.3f} TFLOP   divided: {divided / 1e12:8.3f} TFLOP   "
            f"divided/joint = {divided / joint:.3f}"
        )

    print(f"\n== CPU wall time per layer forward (median of {args.repeats}, {torch.get_num_threads()} threads) ==")
    for volume in ((32, 256, 256), (64, 256, 256)):
        grid = tuple(v // p for v, p in zip(volume, PATCH))
        joint = layer_seconds("joint", volume, args.repeats)
        divided = layer_seconds("divided", volume, args.repeats)
        n = grid[0] * grid[1] * grid[2]
        print(
            f"volume {volume} → {n:5d} tokens: joint {joint * 1e3:8.1f} ms   divided {divided * 1e3:8.1f} ms   "
            f"joint/divided speed-up = {joint / divided:.2f}x"
        )


if __name__ == "__main__":
    main()
