"""Report generation speed on this machine: time to first token and tokens per second of SmolLM2-135M-Instruct (the
default small LM, from its GGUF file) inside `ReCTForConditionalGeneration`, with a 256-token image prefix, with and
without the KV cache.

The model: a 2-layer ReCT encoder (hidden 768, 12 heads) over a 32×128×128 volume, the TAC projector reading both
layers into 256 tokens, and SmolLM2 (fp32). The prompt is SmolLM2's chat template around `<image>` (expanded to
256 tokens) and an instruction, about 290 tokens in all. Greedy decoding of `--new-tokens` tokens; a streamer
stamps the time of every token. Time to first token includes the encoder, the projector and the prefill. Each
setting runs `--runs` times after a warm-up; medians printed, then the ratio cached / uncached.

Usage: python bench/generate.py [--new-tokens 64] [--runs 3] [--prefix 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prefix", type=int, default=256, help="image tokens (image_seq_length)")
    args = parser.parse_args()

    import torch
    from transformers.generation.streamers import BaseStreamer

    from hf_models import (
        ReCTForConditionalGeneration,
        ReCTImageProcessor,
        ReCTVisionConfig,
        ReCTVisionModel,
        ReCTVLMProcessor,
    )
    from trainers.text import smollm2

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    tokenizer, language = smollm2()
    load_seconds = time.perf_counter() - start
    torch.manual_seed(0)
    encoder = ReCTVisionModel(
        ReCTVisionConfig(volume_size=[32, 128, 128], num_hidden_layers=2, num_regions=0, attention_type="divided")
    )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    model = (
        ReCTForConditionalGeneration.from_vision_and_language(
            encoder, language, image_id, image_seq_length=args.prefix
        )
        .to(device)
        .eval()
    )
    processor = ReCTVLMProcessor(
        ReCTImageProcessor(volume_size=[32, 128, 128]), tokenizer, image_seq_length=args.prefix
    )
    conversation = [{"role": "user", "content": "<image>\nWrite the findings of this chest CT."}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    text = processor.tokenizer(prompt.replace("<image>", "<image>" * args.prefix), return_tensors="pt")
    inputs = {
        "input_ids": text["input_ids"].to(device),
        "attention_mask": text["attention_mask"].to(device),
        "pixel_values": torch.rand(1, 1, 32, 128, 128, device=device) * 2 - 1,
    }
    print(
        f"SmolLM2-135M-Instruct from GGUF ({load_seconds:.1f} s to load and dequantise) + 2-layer ReCT encoder at "
        f"32×128×128, TAC projector; prompt {inputs['input_ids'].shape[1]} tokens ({args.prefix} image tokens), "
        f"{args.new_tokens} new tokens greedy, device {device}, {torch.get_num_threads()} threads"
    )

    results = {}
    for use_cache in (True, False):
        ttfts, rates = [], []
        for run in range(args.runs + 1):
            stamps = Stamps()
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    **inputs,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    use_cache=use_cache,
                    streamer=stamps,
                )
            new = out.shape[1] - inputs["input_ids"].shape[1]
            token_times = stamps.times[1:]  # the first put() is the prompt
            if run == 0:
                continue  # warm-up
            ttfts.append(token_times[0] - start)
            rates.append((new - 1) / (token_times[-1] - token_times[0]))
        results[use_cache] = (statistics.median(ttfts), statistics.median(rates))
        label = "with KV cache   " if use_cache else "without KV cache"
        print(f"{label}: time to first token {results[use_cache][0]:.3f} s, {results[use_cache][1]:.1f} tokens/s")
    (ttft_c, rate_c), (ttft_n, rate_n) = results[True], results[False]
    print(f"KV cache: {rate_c / rate_n:.1f}x the tokens/s, time to first token ratio {ttft_n / ttft_c:.2f}x")


if __name__ == "__main__":
    main()
