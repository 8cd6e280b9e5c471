"""What the demo's classifier learns: the demo recipe at the demo's scale, several training seeds, with baselines.

On the demo's phantom cohort (`DEMO_COHORT`, generated once into `--workdir` and reused, as `rect-vlm demo` does)
this trains `ClassifierRecipe()` — the demo's recipe, every finding the phantom renders — once per seed and
evaluates each run on the held-out split. In the same run, two baselines that cannot have learned from the images:

- untrained: the recipe's model as initialised (same seed), scored on the held-out split;
- shuffled labels (image-blind): the same recipe trained on the training volumes with their label rows permuted
  across volumes (the label prevalence and co-occurrence stay, the image–label link is gone). Whatever it scores
  above 0.5 is what prevalence and chance alone give.

Printed: per-label held-out AUROC for every seed, its median over seeds, both baselines; `macro_easy` (the five
large findings) and `macro` (all trained findings); per seed the training wall time and the process CPU time / 2
(the machine has two cores: CPU / 2 is the wall time an otherwise idle machine would need, whatever else ran).
Targets (issue 6): median `macro_easy` >= 0.95 and median `macro` >= 0.85.

`--n-train` and `--max-steps` measure the recipe beyond the demo's budget: each patient is drawn from its own seeds
(cohort seed, split, patient number), so a cohort with more training patients holds the very same held-out scans.
`--shape D H W` renders those same patients on a finer (or coarser) grid and trains the recipe at that volume size,
its patch size scaled by as much (`--patch-size` to choose it), so the encoder keeps the demo's token grid and the
stem and lesion map see the finer voxels: what the grid, rather than the model, costs the small findings.
A workdir keeps one cohort; another `--n-train` or `--shape` regenerates it there.

Usage: python bench/learning.py [--seeds 0 1 2] [--workdir DIR] [--no-shuffled-baseline] [--max-steps N]
                                [--n-train PATIENTS] [--augmentation STRENGTH] [--shape D H W]
                                [--patch-size D H W]
"""

# ruff: noqa: E402 - `short_openmp_spin` must run before torch (imported further down) loads libgomp.
from __future__ import annotations

from trainers.cli import short_openmp_spin


short_openmp_spin()  # as `rect-vlm` does

import argparse
import csv
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from trainers.classification import (
    ClassifierRecipe,
    evaluate_classifier,
    train_classifier,
)
from trainers.data.cache import VolumeCache
from trainers.data.readers import read_ct_rate
from trainers.data.volume_dataset import CachedVolumeDataset
from trainers.demo import demo_cohort_parameters, prepare_cohort


TARGETS = {"macro_easy": 0.95, "macro": 0.85}


def shuffled_label_cohort(cohort: Path, folder: Path, seed: int) -> Path:
    """A view of `cohort` whose training labels CSV has its label rows permuted across volumes (volume names,
    reports and files unchanged; the held-out split untouched). Everything else is linked, so cache entries (keyed
    by resolved paths) are shared with the original."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in cohort.iterdir():
        if item.name != "dataset" and not (folder / item.name).exists():
            (folder / item.name).symlink_to(item.resolve())
    dataset = folder / "dataset"
    dataset.mkdir(exist_ok=True)
    for item in (cohort / "dataset").iterdir():
        if item.name != "multi_abnormality_labels" and not (dataset / item.name).exists():
            (dataset / item.name).symlink_to(item.resolve())
    labels_dir = dataset / "multi_abnormality_labels"
    labels_dir.mkdir(exist_ok=True)
    for csv_file in (cohort / "dataset" / "multi_abnormality_labels").iterdir():
        with open(csv_file, newline="") as handle:
            rows = list(csv.reader(handle))
        header, body = rows[0], rows[1:]
        if csv_file.name.startswith("train"):
            order = np.random.default_rng(seed).permutation(len(body))
            body = [[row[0], *body[j][1:]] for row, j in zip(body, order)]
        with open(labels_dir / csv_file.name, "w", newline="") as handle:
            csv.writer(handle).writerows([header, *body])
    return folder


def untrained_auroc(cohort: Path, recipe: ClassifierRecipe, cache_dir: Path) -> dict:
    """Held-out AUROC of the recipe's model as initialised (seeded as a training run would be)."""
    from transformers import set_seed

    from hf_models import ReCTForVolumeClassification

    set_seed(recipe.seed)
    cache = VolumeCache(cache_dir, recipe.image_processor())
    valid = CachedVolumeDataset(read_ct_rate(cohort, "valid", cot=False), cache, label_indices=recipe.label_indices())
    valid.prepare(progress=False)
    model = ReCTForVolumeClassification(recipe.model_config())
    return evaluate_classifier(model, valid, recipe.eval_batch_size, recipe.label_names, progress=False)


def grid_overrides(recipe: ClassifierRecipe, shape, patch_size) -> dict:
    """`volume_size` and `patch_size` of `recipe` on the grid `shape` (None: the recipe's): the patch scaled by
    `shape / volume_size` unless `patch_size` is given.

    Raises:
        ValueError: `shape` is not a whole multiple or fraction of the recipe's volume size per axis, or the patch
            does not tile it.
    """
    shape = tuple(int(v) for v in (shape or recipe.volume_size))
    if patch_size is None:
        patch = []
        for s, v, p in zip(shape, recipe.volume_size, recipe.patch_size):
            if (s * p) % v:
                raise ValueError(
                    f"--shape {list(shape)}: scaling the patch {list(recipe.patch_size)} from the volume size "
                    f"{list(recipe.volume_size)} needs whole patch sizes; pass --patch-size"
                )
            patch.append(s * p // v)
        patch_size = patch
    patch_size = tuple(int(v) for v in patch_size)
    if any(s % p for s, p in zip(shape, patch_size)):
        raise ValueError(f"--patch-size {list(patch_size)} does not tile the volume size {list(shape)}")
    return {"volume_size": shape, "patch_size": patch_size}


def _cell(value) -> str:
    return "   n/a" if value is None else f"{value:6.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--workdir", default=None, help="keeps the cohort and the cache between runs")
    parser.add_argument("--no-shuffled-baseline", action="store_true", help="skip the shuffled-label run")
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument(
        "--augmentation", type=float, default=None, help="override the recipe's augmentation strength (0 = none)"
    )
    parser.add_argument(
        "--n-train",
        type=int,
        default=None,
        help="training patients of the cohort (default the demo's); the held-out patients stay the same ones",
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("D", "H", "W"),
        help="the cohort's grid and the recipe's volume size (default the demo's 32 64 64)",
    )
    parser.add_argument(
        "--patch-size",
        type=int,
        nargs=3,
        default=None,
        metavar=("D", "H", "W"),
        help="the encoder's patch size (default the recipe's, scaled with --shape)",
    )
    args = parser.parse_args()

    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "rect_bench_learning").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cohort, cache = workdir / "cohort", workdir / "cache"
    params = demo_cohort_parameters(n_train=args.n_train, shape=args.shape)
    print(f"cohort {json.dumps(params)} → {cohort}")
    start = time.perf_counter()
    stamp = prepare_cohort(cohort, params, progress=True)
    print(f"  {stamp['volumes']} volumes ({'reused' if stamp['reused'] else f'{time.perf_counter() - start:.0f} s'})")

    base = ClassifierRecipe()
    if args.max_steps:
        base = dataclasses.replace(base, max_steps=args.max_steps)
    if args.augmentation is not None:
        base = dataclasses.replace(base, augmentation=args.augmentation)
    if args.shape or args.patch_size:
        base = dataclasses.replace(base, **grid_overrides(base, args.shape, args.patch_size))
    print(
        f"recipe: {len(base.label_names)} findings, {base.max_steps} steps × batch {base.batch_size}, "
        f"volumes {base.volume_size}, patch {base.patch_size}, {base.num_hidden_layers} × {base.hidden_size} "
        f"encoder, augmentation {base.augmentation}, torch threads {torch.get_num_threads()}"
    )
    runs: dict[str, dict] = {}
    for seed in args.seeds:
        recipe = dataclasses.replace(base, seed=seed)
        cpu = time.process_time()
        summary = train_classifier(cohort, workdir / f"seed_{seed}", recipe, cache_dir=cache)
        runs[f"seed {seed}"] = {
            "auroc": summary["valid_auroc"],
            "train_seconds": summary["train_seconds"],
            "train_cpu_seconds": summary["train_cpu_seconds"],
            "process_cpu_seconds": round(time.process_time() - cpu, 1),
        }
        auroc = summary["valid_auroc"]
        print(
            f"  seed {seed}: macro_easy {_cell(auroc.get('macro_easy'))}, macro {_cell(auroc['macro'])}; training "
            f"{summary['train_seconds']:.0f} s wall, {summary['train_cpu_seconds'] / 2:.0f} s CPU/2"
        )
    baselines: dict[str, dict] = {"untrained": untrained_auroc(cohort, dataclasses.replace(base, seed=0), cache)}
    if not args.no_shuffled_baseline:
        shuffled = shuffled_label_cohort(cohort, workdir / "cohort_shuffled_labels", seed=0)
        summary = train_classifier(shuffled, workdir / "shuffled", dataclasses.replace(base, seed=0), cache_dir=cache)
        baselines["shuffled labels"] = summary["valid_auroc"]

    seeds = list(runs)
    rows = [*base.label_names, "macro_easy", "macro"]
    median = {}
    for name in rows:
        values = [runs[s]["auroc"].get(name) for s in seeds]
        values = [v for v in values if v is not None]
        median[name] = statistics.median(values) if values else None
    columns = [*seeds, "median", *baselines]
    print(f"\nheld-out AUROC (demo cohort on a {params['shape']} grid, valid split)")
    print(f"{'finding':36s} " + " ".join(f"{c[:15]:>15s}" for c in columns))
    for name in rows:
        cells = [runs[s]["auroc"].get(name) for s in seeds] + [median[name]]
        cells += [baseline.get(name) for baseline in baselines.values()]
        print(f"{name:36s} " + " ".join(f"{_cell(v):>15s}" for v in cells))
    print(
        f"{'training wall s':36s} "
        + " ".join(f"{runs[s]['train_seconds']:15.0f}" for s in seeds)
        + f" {statistics.median(runs[s]['train_seconds'] for s in seeds):15.0f}"
    )
    print(
        f"{'training CPU s / 2':36s} "
        + " ".join(f"{runs[s]['train_cpu_seconds'] / 2:15.0f}" for s in seeds)
        + f" {statistics.median(runs[s]['train_cpu_seconds'] / 2 for s in seeds):15.0f}"
    )
    for key, target in TARGETS.items():
        value = median[key]
        verdict = "met" if value is not None and value >= target else "NOT met"
        print(f"target: median {key} >= {target}: {_cell(value).strip()} ({verdict})")
    result = {
        "cohort": params,
        "recipe": dataclasses.asdict(base),
        "runs": runs,
        "median": median,
        "baselines": baselines,
        "targets": TARGETS,
    }
    (workdir / "learning.json").write_text(json.dumps(result, indent=1))
    print(f"results → {workdir / 'learning.json'}")


if __name__ == "__main__":
    main()
