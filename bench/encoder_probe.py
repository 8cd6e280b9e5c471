"""What a trained classifier's encoder represents: does it see where a finding is, or only whether a scan has it?

For a classifier folder trained with lesion-token supervision (`ReCTConfig.lesion_token_loss_weight` > 0, as the
demo's), on a CT-RATE-layout phantom cohort with lesion masks, per label and per split (held-out, and as many
training volumes as `--train-volumes`):

- `classifier`: the AUROC of the classifier's own scores (what `rect-vlm demo` prints);
- `token max`: the AUROC of the lesion-token head's highest token logit per volume. A head that detects the finding
  where it lies scores as well as the classifier or better; a head that has only learnt where the finding may lie
  (its location prior) scores about 0.5;
- `token`: the AUROC of that head over every token of every volume against the token targets (`LesionTokenTargets`):
  the location prior alone already makes it high.

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
    LesionTokenTargets,
)
from trainers.data.cache import VolumeCache  # noqa: E402
from trainers.data.phantom import LESION_IDS  # noqa: E402
from trainers.data.readers import read_ct_rate  # noqa: E402
from trainers.data.volume_dataset import CachedVolumeDataset  # noqa: E402
from trainers.metrics import multilabel_auroc  # noqa: E402


def probe(model, dataset: CachedVolumeDataset, names: list[str], batch: int) -> dict[str, dict]:
    """Per-label AUROC of the classifier, of the token head's maximum and of the token head per token."""
    prefix = model.vision_model.config.num_prefix_tokens
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=LesionSupervisedCollator())
    scores, token_max, token_logits, token_targets, labels = [], [], [], [], []
    with torch.no_grad():
        for examples in loader:
            output = model(pixel_values=examples["pixel_values"], output_hidden_states=True)
            tokens = model.lesion_token_classifier(output.hidden_states[-1][:, prefix:])
            scores.append(output.logits)
            token_max.append(tokens.amax(dim=1))
            token_logits.append(tokens.flatten(0, 1))
            token_targets.append(examples["lesion_tokens"].flatten(0, 1))
            labels.append(examples["labels"])
    labels = torch.cat(labels).numpy()
    return {
        "classifier": multilabel_auroc(torch.cat(scores).float().numpy(), labels, names),
        "token max": multilabel_auroc(torch.cat(token_max).float().numpy(), labels, names),
        "token": multilabel_auroc(torch.cat(token_logits).float().numpy(), torch.cat(token_targets).numpy(), names),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a ReCTForVolumeClassification folder with a lesion-token head")
    parser.add_argument("--cohort", type=Path, required=True, help="CT-RATE-layout cohort with masks/lesion/")
    parser.add_argument("--cache", type=Path, default=None, help="processed-volume cache (default: a temporary one)")
    parser.add_argument("--train-volumes", type=int, default=300, help="training volumes probed (0: none)")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    model = ReCTForVolumeClassification.from_pretrained(args.folder).eval()
    if model.lesion_token_classifier is None:
        raise SystemExit(
            f"{args.folder}: the model has no lesion-token head (config.lesion_token_loss_weight is 0), "
            "nothing to probe"
        )
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    unknown = [name for name in names if name not in LESION_IDS]
    if unknown:
        raise SystemExit(f"{args.folder}: labels {unknown} have no lesion id in the phantom's masks")
    label_indices = ClassifierRecipe(label_names=tuple(names)).label_indices()
    targets = LesionTokenTargets(model.config.vision_config.patch_size, [LESION_IDS[name] for name in names])
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
        print(f"\n{split} ({args.cohort}): AUROC per label")
        print(f"  {'label':36s} {'classifier':>10s} {'token max':>10s} {'token':>8s}")
        for name in names + ["macro"]:
            row = [result[kind][name] for kind in ("classifier", "token max", "token")]
            print(
                f"  {name:36s} "
                + " ".join(f"{'-' if v is None else f'{v:.3f}':>{w}s}" for v, w in zip(row, (10, 10, 8)))
            )
        easy = [n for n in EASY_LABELS if n in names]
        for kind in ("classifier", "token max"):
            small = [result[kind][n] for n in names if n not in easy and result[kind][n] is not None]
            print(f"  {kind}: five large findings {np.mean([result[kind][n] for n in easy]):.3f}, the other "
                  f"{len(small)} {np.mean(small):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
