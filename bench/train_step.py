"""Throughput and peak memory of one training step of the vision pre-training recipe (contrastive + region loss).

The model is `trainers/recipes/vision_pretrain.yaml`'s ReCTModel (hidden 768, 12 heads, 20 anatomy regions, a BERT
text tower), with AdamW as the recipe sets it, on random volumes, anatomy masks and report tokens. Every
configuration — two volume sizes × gradient checkpointing off/on × divided/joint attention — runs in its own
process, so each peak is its own: on CUDA `torch.cuda.max_memory_allocated`, on the CPU the growth of the process's
peak resident memory over what it held once the model and optimizer were built (`ru_maxrss`). Printed: seconds
per step (median after warm-up steps), samples/second, peak memory, and the ratios checkpointing on/off and
divided/joint at each size.

The recipe's 12 layers at 64×512×512 need a GPU; on this machine's CPUs the defaults keep the recipe's width and
use 2 layers at 32×128×128 and 64×256×256 (`--layers 12 --sizes 64x512x512 ...` for the real geometry on a GPU).

Usage: python bench/train_step.py [--layers 2] [--sizes 32x128x128 64x256x256] [--batch 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import sys

from _measure import REPO_ROOT, run_child, timed_peak


sys.path.insert(0, str(REPO_ROOT))


def one_configuration(size: list[int], layers: int, batch: int, steps: int, checkpointing: bool, attention: str):
    """Build the model, run warm-up + timed steps; returns the measurements (runs in a child process)."""
    import torch

    from hf_models import ReCTConfig, ReCTModel
    from trainers.recipes import load_recipe

    recipe = load_recipe("vision_pretrain")
    config = dict(recipe.model.config)
    vision = dict(config["vision_config"], volume_size=size, num_hidden_layers=layers, attention_type=attention)
    text = dict(config["text_config"], num_hidden_layers=min(layers, 12))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = ReCTModel(ReCTConfig(**{**config, "vision_config": vision, "text_config": text})).to(device)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    opt = recipe.optimization
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)
    regions = model.config.vision_config.num_regions
    pixel_values = torch.rand(batch, 1, *size, device=device)
    anatomy_mask = torch.randint(0, regions + 1, (batch, 1, *size), device=device)
    input_ids = torch.randint(1000, 2000, (batch, 128), device=device)
    region_mentions = (torch.rand(batch, regions, device=device) < 0.3).float()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def step() -> None:
        with autocast:
            out = model(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=pixel_values,
                anatomy_mask=anatomy_mask,
                region_mentions=region_mentions,
                return_loss=True,
            )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    measured = timed_peak(step, steps)  # the warm-up step also allocates the optimizer state
    seconds = measured["seconds"]
    return {
        "seconds_per_step": seconds,
        "samples_per_second": batch / seconds,
        "peak_mib": measured["peak_mib"],
        "device": measured["device"],
        "tokens": model.config.vision_config.patch_grid[0]
        * model.config.vision_config.patch_grid[1]
        * model.config.vision_config.patch_grid[2],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="encoder (and text) layers (the recipe: 12)")
    parser.add_argument("--sizes", nargs="+", default=["32x128x128", "64x256x256"], help="volume sizes DxHxW")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # one configuration, in this process
        spec = json.loads(args.child)
        print(json.dumps(one_configuration(**spec)))
        return 0

    results = {}
    for text_size in args.sizes:
        size = [int(v) for v in text_size.lower().split("x")]
        for attention in ("divided", "joint"):
            for checkpointing in (False, True):
                spec = dict(
                    size=size,
                    layers=args.layers,
                    batch=args.batch,
                    steps=args.steps,
                    checkpointing=checkpointing,
                    attention=attention,
                )
                result = run_child(__file__, spec)
                results[(text_size, attention, checkpointing)] = result
                print(
                    f"{text_size:>12} ({result['tokens']:5d} tokens) {attention:7s} checkpointing "
                    f"{'on ' if checkpointing else 'off'}: {result['seconds_per_step']:7.3f} s/step  "
                    f"{result['samples_per_second']:6.2f} samples/s  peak {result['peak_mib']:8.0f} MiB",
                    flush=True,
                )
    print(f"\ndevice: {result['device']}; batch {args.batch}, {args.layers} layers, hidden 768 (vision_pretrain)")
    print("ratios (same size):")

    def ratio(a: dict, b: dict) -> str:
        time_ratio = a["seconds_per_step"] / b["seconds_per_step"]
        return f"time {time_ratio:.2f}x, peak memory {a['peak_mib'] / max(b['peak_mib'], 1e-9):.2f}x"

    for text_size in args.sizes:
        for attention in ("divided", "joint"):
            on, off = results[(text_size, attention, True)], results[(text_size, attention, False)]
            print(f"  {text_size:>12} {attention:7s} checkpointing on/off: {ratio(on, off)}")
        for checkpointing in (False, True):
            divided, joint = (results[(text_size, kind, checkpointing)] for kind in ("divided", "joint"))
            state = "on " if checkpointing else "off"
            print(f"  {text_size:>12} checkpointing {state} divided/joint: {ratio(divided, joint)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
