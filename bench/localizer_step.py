"""One training step of the demo-scale localizer with its decoder's convolutions channels-last (the default) and in
PyTorch's default contiguous layout: seconds per step, peak memory, the ratio, and the first step's loss both ways.

The model and optimizer are those `make demo` and `bench/localization.py` train (`trainers.demo.
demo_localization_recipe`: the classifier's encoder shape at 32×64×64 with 4 windows, a MiniLM text tower, fusion
width 128, decoder 64/32/16/8; the optimizer its `ReCTTrainer` builds), on random volumes, K text prompts per volume
and random target masks. Each layout runs in its own process (`hf_models.modeling_localizer_rect.DECODER_MEMORY_FORMAT`
set there), so each peak is its own: on CUDA `torch.cuda.max_memory_allocated`, on the CPU the growth of the
process's peak resident memory over what it held once the model and optimizer were built (`ru_maxrss`).

Usage: python bench/localizer_step.py [--batch 2] [--targets 16] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from _measure import REPO_ROOT, run_child, timed_peak


sys.path.insert(0, str(REPO_ROOT))

LAYOUTS = ("channels_last", "contiguous")


def one_layout(layout: str, batch: int, targets: int, runs: int) -> dict:
    """Build the model and optimizer, then time `runs` training steps after one warm-up (child process)."""
    import torch

    import hf_models.modeling_localizer_rect as localizer_module
    from hf_models import ReCTConfig, ReCTForLesionLocalization
    from trainers.demo import demo_localization_recipe
    from trainers.train import model_with_text_tower
    from trainers.trainer import ReCTTrainer

    localizer_module.DECODER_MEMORY_FORMAT = {
        "channels_last": torch.channels_last_3d,
        "contiguous": torch.contiguous_format,
    }[layout]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    recipe = demo_localization_recipe(0, targets=targets)
    torch.manual_seed(0)
    model, tokenizer = model_with_text_tower(recipe, ReCTForLesionLocalization, ReCTConfig)
    model = model.to(device)
    # The optimizer training builds: the recipe's `ReCTTrainer` with its parameter groups (the text tower apart).
    with tempfile.TemporaryDirectory() as output_dir:
        args = recipe.training_arguments(output_dir, report_to=[], use_cpu=not cuda)
        optimizer = ReCTTrainer(model=model, args=args, **recipe.trainer_kwargs()).create_optimizer()
    size = list(recipe.data.volume_size)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.rand(batch, len(recipe.data.windows), *size, generator=generator).to(device)
    tokens = tokenizer(
        ["pleural effusion"] * (batch * targets), padding="max_length", max_length=8, return_tensors="pt"
    )
    labels = (torch.rand(batch, targets, *size, generator=generator) > 0.97).float().to(device)
    inputs = {
        "pixel_values": pixel_values,
        "input_ids": tokens["input_ids"].view(batch, targets, -1).to(device),
        "attention_mask": tokens["attention_mask"].view(batch, targets, -1).to(device),
        "labels": labels,
    }
    with torch.no_grad():  # before any update and without dropout: the same weights and inputs in both layouts
        first_loss = model.eval()(**inputs).loss.item()
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def step() -> None:
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    return {**timed_peak(step, runs), "first_loss": first_loss}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="volumes per step (the demo's: 2)")
    parser.add_argument("--targets", type=int, default=16, help="K: text prompts (masks) per volume")
    parser.add_argument("--runs", type=int, default=5, help="timed steps per layout (after one warm-up)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(one_layout(**json.loads(args.child))))
        return 0

    result = {}
    for layout in LAYOUTS:
        result[layout] = run_child(
            __file__, dict(layout=layout, batch=args.batch, targets=args.targets, runs=args.runs)
        )
        r = result[layout]
        print(
            f"{layout:>14}: {r['seconds']:.3f} s/step, peak {r['peak_mib']:6.0f} MiB, first loss {r['first_loss']:.6f}"
        )
    fast, slow = result["channels_last"], result["contiguous"]
    print(
        f"contiguous / channels-last: time {slow['seconds'] / fast['seconds']:.2f}x, memory "
        f"{slow['peak_mib'] / max(fast['peak_mib'], 1e-9):.2f}x; |Δ first loss| "
        f"{abs(slow['first_loss'] - fast['first_loss']):.2e}"
    )
    print(
        f"device: {fast['device']}; batch {args.batch} × K = {args.targets} prompts, 32×64×64 (the demo's localizer)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
