"""What a trained classifier's encoder represents: does it see where a finding is, or only whether a scan has it?

For a classifier folder trained with lesion supervision — a lesion-map decoder (`ReCTConfig.lesion_map_channels`,
as the demo's) or a lesion-token head (`ReCTConfig.lesion_token_loss_weight` > 0, as the demo's before it) — on a
CT-RATE-layout phantom cohort with lesion masks, per label and per split (held-out, and as many training volumes as
`--train-volumes`):

- `classifier`: the AUROC of the classifier's own scores (what `rect-vlm demo` prints);
- `<head> max`: the AUROC of the head's highest logit per volume (the map's cells, or the tokens). A head that
  detects the finding where it lies scores as well as the classifier or better; a head that has only learnt where
  the finding may lie (its location prior) scores about 0.5;
- `<head> cell`: the AUROC of that head over every cell (token) of every volume against its targets
  (`LesionMapTargets`, `LesionTokenTargets`): the location prior alone already makes it high.

The volumes are read through the processed-volume cache with the folder's own image processor.

Usage: python bench/encoder_probe.py FOLDER --cohort COHORT [--cache DIR] [--train-volumes 300] [--batch 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_models import ReCTForVolumeClassification, ReCTImageProcessor  # noqa: E402
from trainers.classification import (  # noqa: E402
    EASY_LABELS,
    ClassifierRecipe,
    LesionSupervisedCollator,
    lesion_target_transforms,
)
from trainers.data.augmentation import Compose  # noqa: E402
from trainers.data.cache import VolumeCache  # noqa: E402
from trainers.data.phantom import LESION_IDS  # noqa: E402
from trainers.data.readers import read_ct_rate  # noqa: E402
from trainers.data.volume_dataset import CachedVolumeDataset  # noqa: E402
from trainers.metrics import multilabel_auroc  # noqa: E402


def head_logits(model, output, examples) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per head, its logits `(batch, cells, labels)` and targets of the same shape."""
    heads = {}
    if model.lesion_map_decoder is not None:
        cells = output.lesion_map_logits.flatten(2).transpose(1, 2)
        heads["map"] = cells, examples["lesion_maps"].flatten(2).transpose(1, 2)
    if model.lesion_token_classifier is not None:
        tokens = output.hidden_states[-1][:, model.vision_model.config.num_prefix_tokens :]
        heads["token"] = model.lesion_token_classifier(tokens), examples["lesion_tokens"]
    return heads


def probe(model, dataset: CachedVolumeDataset, names: list[str], batch: int) -> dict[str, dict]:
    """Per-label AUROC of the classifier, and of each lesion head's maximum and per cell."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=LesionSupervisedCollator())
    collected: dict[str, list] = {"classifier": [], "labels": []}
    with torch.no_grad():
        for examples in loader:
            output = model(pixel_values=examples["pixel_values"], output_hidden_states=True)
            collected["classifier"].append(output.logits)
            collected["labels"].append(examples["labels"])
            for head, (logits, targets) in head_logits(model, output, examples).items():
                collected.setdefault(f"{head} max", []).append(logits.amax(dim=1))
                collected.setdefault(f"{head} cell", []).append(logits.flatten(0, 1))
                collected.setdefault(f"{head} cell targets", []).append(targets.flatten(0, 1))
    stacked = {key: torch.cat(value).float().numpy() for key, value in collected.items()}
    labels = stacked.pop("labels")
    return {
        kind: multilabel_auroc(values, stacked[f"{kind} targets"] if kind.endswith("cell") else labels, names)
        for kind, values in stacked.items()
        if not kind.endswith("targets")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a ReCTForVolumeClassification folder with a lesion head")
    parser.add_argument("--cohort", type=Path, required=True, help="CT-RATE-layout cohort with masks/lesion/")
    parser.add_argument("--cache", type=Path, default=None, help="processed-volume cache (default: a temporary one)")
    parser.add_argument("--train-volumes", type=int, default=300, help="training volumes probed (0: none)")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    model = ReCTForVolumeClassification.from_pretrained(args.folder).eval()
    if model.lesion_token_classifier is None and model.lesion_map_decoder is None:
        raise SystemExit(
            f"{args.folder}: the model has no lesion head (config.lesion_map_channels is empty and "
            "config.lesion_token_loss_weight is 0), nothing to probe"
        )
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    unknown = [name for name in names if name not in LESION_IDS]
    if unknown:
        raise SystemExit(f"{args.folder}: labels {unknown} have no lesion id in the phantom's masks")
    label_indices = ClassifierRecipe(label_names=tuple(names)).label_indices()
    targets = Compose(lesion_target_transforms(model.config, names))
    with tempfile.TemporaryDirectory() as scratch:
        cache = VolumeCache(args.cache or Path(scratch), ReCTImageProcessor.from_pretrained(args.folder))
        results = {}
        for split, limit in (("valid", None), ("train", args.train_volumes)):
            if limit == 0:
                continue
            rows = read_ct_rate(args.cohort, split, cot=False, lesion_masks=True)
            rows = rows.select(range(min(limit, len(rows)))) if limit else rows
            dataset = CachedVolumeDataset(
                rows, cache, label_indices=label_indices, lesion_column="lesion_mask_path", transform=targets
            )
            dataset.prepare(progress=False)
            results[split] = probe(model, dataset, names, args.batch)
    for split, result in results.items():
        kinds = list(result)
        print(f"\n{split} ({args.cohort}): AUROC per label")
        print(f"  {'label':36s} " + " ".join(f"{kind:>10s}" for kind in kinds))
        for name in names + ["macro"]:
            row = [result[kind][name] for kind in kinds]
            print(f"  {name:36s} " + " ".join(f"{'-' if v is None else f'{v:.3f}':>10s}" for v in row))
        easy = [n for n in EASY_LABELS if n in names]
        for kind in [k for k in kinds if not k.endswith("cell")]:
            small = [result[kind][n] for n in names if n not in easy and result[kind][n] is not None]
            print(f"  {kind}: five large findings {np.mean([result[kind][n] for n in easy]):.3f}, the other "
                  f"{len(small)} {np.mean(small):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
