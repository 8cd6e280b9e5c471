"""Raw research checkpoints → Hub-ready ReCT folders, with every key accounted for (SPEC §7).

`convert(src, out, format=...)` reads a checkpoint (`readers`), maps its keys declaratively (`mapping`, `layouts`),
loads them strictly into the target ReCT model and writes a safetensors `save_pretrained` folder with
`conversion_report.json` and `manifest.json`, atomically (`writer`). `rect-vlm convert` is its command line.
"""

from .convert import FORMATS, ConversionResult, convert, detect_format
from .mapping import ConversionReport, Drop, KeyMapping, Rename, identity_mapping
from .readers import (
    CheckpointReadError,
    ConversionError,
    SourceCheckpoint,
    UnsafeCheckpointError,
    load_checkpoint_file,
    read_deepspeed,
    read_lightning,
    read_peft,
    read_raw,
)
from .writer import verify_manifest


__all__ = [
    "FORMATS",
    "CheckpointReadError",
    "ConversionError",
    "ConversionReport",
    "ConversionResult",
    "Drop",
    "KeyMapping",
    "Rename",
    "SourceCheckpoint",
    "UnsafeCheckpointError",
    "convert",
    "detect_format",
    "identity_mapping",
    "load_checkpoint_file",
    "read_deepspeed",
    "read_lightning",
    "read_peft",
    "read_raw",
    "verify_manifest",
]
