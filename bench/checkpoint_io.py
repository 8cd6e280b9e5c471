"""Checkpoint I/O: save and load time of an 88M-parameter encoder as safetensors vs `torch.save` / `torch.load`, and
the time to convert a DeepSpeed ZeRO-3 folder of it into a Hub folder.

The encoder is a `ReCTVisionModel` with the seed's width (hidden 768, 12 layers, 12 heads, MLP 3072, joint
attention) over 32×256×256 volumes: 87.4M parameters, 333 MiB in fp32. Each format is saved and loaded `--runs`
times into a temporary folder on the same disk after one warm-up (medians printed; loads read from the page cache,
as a second load does in practice, and end with the weights copied into a model). `torch.load` runs with
`weights_only=True`, the only way the converter reads pickles.

The ZeRO-3 folder is written by DeepSpeed itself (one CPU process, gloo, one SGD step) in a child process; then
`rect-vlm convert`'s code path runs on it: DeepSpeed's consolidation (`read_deepspeed`), the key accounting, the
safetensors write and the bit-exact reload check. Printed: consolidation seconds, whole conversion seconds, and the
conversion's ratio to a plain safetensors save of the same weights.

Usage: python bench/checkpoint_io.py [--runs 3] [--skip-deepspeed]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

ENCODER = dict(
    volume_size=[32, 256, 256],
    patch_size=[4, 16, 16],
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    attention_type="joint",
    num_regions=0,
)

ZERO_SCRIPT = """
import json, os, sys
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
sys.path.insert(0, sys.argv[2])
import deepspeed, torch
from hf_models import ReCTVisionConfig, ReCTVisionModel

torch.manual_seed(0)
model = ReCTVisionModel(ReCTVisionConfig(**json.loads(sys.argv[3])))
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
          "zero_allow_untested_optimizer": True}
deepspeed.init_distributed(dist_backend="gloo")
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), config=config)
loss = engine(torch.randn(1, 1, 32, 256, 256)).last_hidden_state.square().mean()
engine.backward(loss)
engine.step()
engine.save_checkpoint(sys.argv[1])
"""


def timed(fn, runs: int, warmup: int = 0) -> tuple[float, object]:
    times, result = [], None
    for _ in range(warmup):
        fn()
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-deepspeed", action="store_true")
    args = parser.parse_args()

    import json

    import torch
    from safetensors.torch import load_file, save_file

    from hf_models import ReCTVisionConfig, ReCTVisionModel

    torch.manual_seed(0)
    model = ReCTVisionModel(ReCTVisionConfig(**ENCODER))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    params = sum(v.numel() for v in state.values())
    print(
        f"encoder: {params / 1e6:.1f}M parameters, {params * 4 / 2**20:.0f} MiB fp32; one warm-up, then medians of "
        f"{args.runs} runs; loads end in `model.load_state_dict`"
    )

    with tempfile.TemporaryDirectory(dir=REPO_ROOT) as tmp:
        tmp = Path(tmp)
        st, pt = tmp / "model.safetensors", tmp / "model.pt"
        save_st, _ = timed(lambda: save_file(model.state_dict(), st), args.runs, warmup=1)
        save_pt, _ = timed(lambda: torch.save(model.state_dict(), pt), args.runs, warmup=1)
        # A load ends with the weights in a model (safetensors maps the file lazily; copying them in reads it all).
        target = ReCTVisionModel(ReCTVisionConfig(**ENCODER))
        load_st, _ = timed(lambda: target.load_state_dict(load_file(st)), args.runs, warmup=1)
        assert all(torch.equal(target.state_dict()[k], state[k]) for k in state)
        load_pt, _ = timed(
            lambda: target.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True)), args.runs, warmup=1
        )
        print(
            f"save  safetensors {save_st:.3f} s   torch.save {save_pt:.3f} s   ratio torch/safetensors "
            f"{save_pt / save_st:.2f}x"
        )
        print(
            f"load  safetensors {load_st:.3f} s   torch.load(weights_only) {load_pt:.3f} s   ratio "
            f"torch/safetensors {load_pt / load_st:.2f}x"
        )

        if args.skip_deepspeed:
            return
        zero = tmp / "zero"
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", ZERO_SCRIPT, str(zero), str(REPO_ROOT), json.dumps(ENCODER)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"writing the ZeRO-3 checkpoint failed:\n{proc.stderr[-3000:]}")
        print(
            f"ZeRO-3 checkpoint written by DeepSpeed in {time.perf_counter() - start:.1f} s "
            f"({sum(f.stat().st_size for f in zero.rglob('*') if f.is_file()) / 2**20:.0f} MiB on disk)"
        )

        from conversion import convert, read_deepspeed

        consolidate, checkpoint = timed(lambda: read_deepspeed(zero), 1)
        print(
            f"consolidate (DeepSpeed zero_to_fp32, after the weights-only safety pass) {consolidate:.2f} s, "
            f"{len(checkpoint.state_dict)} tensors"
        )
        config = {**ReCTVisionConfig(**ENCODER).to_dict(), "architectures": ["ReCTVisionModel"]}
        start = time.perf_counter()
        convert(zero, tmp / "hub", config=config)
        whole = time.perf_counter() - start
        print(
            f"convert ZeRO-3 folder → Hub folder (consolidate, account, save, verify reload, manifest) {whole:.2f} s"
            f" = {whole / save_st:.1f}x a plain safetensors save"
        )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
