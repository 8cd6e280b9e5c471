"""What the report generator learns: the demo's report recipe at the demo's scale, several seeds, next to an
image-blind baseline.

On the demo's phantom cohort (`DEMO_COHORT`, generated once into `--workdir` and reused, as `rect-vlm demo` does)
this trains `ReportRecipe()` (the demo's classifier, frozen: its encoder feeds the TAC projector and its head writes
the findings it sees into the diagnosis tokens; + SmolLM2-135M-Instruct from the packaged GGUF file; stage 1 the
projector, stage 2 LoRA on every linear layer of the LM) once per seed, writes the impression of
every held-out scan (`--eval-limit` caps them) and reads the findings back out of the generated text. In the same
run, per seed, the image-blind baseline: the same recipe trained and evaluated with every volume replaced by zeros,
so whatever it gets right comes from the report texts alone (the findings' prevalence, their co-occurrence).

The encoder is `--encoder` (a `classifier/model/` or `vision_encoder/` folder that `rect-vlm demo` wrote; the latter
has no head, so no diagnosis tokens), or the demo's classifier trained here once (seed 0, `ClassifierRecipe()`) and
reused from `--workdir`. `--no-diagnosis` trains without the diagnosis tokens (the projector's tokens alone).

Printed per seed and as the median over seeds, image vs image-blind: clinical-efficacy F1 over the five large
findings (`clinical_f1_macro_five`), over every finding (macro / micro), BLEU-4, ROUGE-L, and on follow-up scans
how often the stated change since the prior (new / increased / decreased / unchanged) is right when the prior scan
is given and when it is withheld (the current scan stands in). Targets (issue 9): median F1 over the five large
findings >= 0.7, >= 0.2 above the image-blind baseline, follow-up changes right more often with the prior.

Usage: python bench/report_generation.py [--seeds 0 1 2] [--workdir DIR] [--encoder DIR] [--eval-limit N]
       [--stage1-steps N] [--stage2-steps N] [--no-blind-baseline] [--no-diagnosis] [--ceiling-only]
"""

# ruff: noqa: E402 - `short_openmp_spin` must run before torch (imported further down) loads libgomp.
from __future__ import annotations

from trainers.cli import short_openmp_spin


short_openmp_spin()  # as `rect-vlm` does

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

from trainers.cli import silence_optional_kernel_probe


silence_optional_kernel_probe()  # before the Trainer imports bitsandbytes (see its docstring)

from trainers.classification import ClassifierRecipe, train_classifier
from trainers.demo import demo_cohort_parameters, prepare_cohort
from trainers.report_training import ReportRecipe, train_report_generator


TARGETS = {"clinical_f1_macro_five": 0.7, "gap_over_image_blind": 0.2}

#: (label, how to read it from a run's metrics)
ROWS = (
    ("F1, five large findings", lambda m: m["clinical_f1_macro_five"]),
    ("F1 macro, all findings", lambda m: m["clinical_f1_macro"]),
    ("F1 micro, all findings", lambda m: m["clinical_f1_micro"]),
    ("BLEU-4", lambda m: m["bleu_4"]),
    ("ROUGE-L", lambda m: m["rouge_l"]),
    ("follow-up changes, with prior", lambda m: (m.get("follow_up_with_prior") or {}).get("follow_up_accuracy")),
    ("follow-up changes, no prior", lambda m: (m.get("follow_up_without_prior") or {}).get("follow_up_accuracy")),
)


def _cell(value) -> str:
    return "      -" if value is None else f"{value:7.3f}"


def encoder_folder(args, workdir: Path, cohort: Path, cache: Path) -> Path:
    if args.encoder:
        return Path(args.encoder).resolve()
    folder = workdir / "classifier"
    if not (folder / "model" / "model.safetensors").is_file():
        print("training the demo's classifier once for its encoder (seed 0) →", folder)
        train_classifier(cohort, folder, ClassifierRecipe(), cache_dir=cache)
    return folder / "model"


def diagnosis_ceiling(encoder: Path, cohort: Path, cache: Path, recipe: ReportRecipe) -> dict[str, float] | None:
    """F1 of the diagnosis head alone (the classifier's decisions at the generator's threshold) against the findings
    each held-out reference impression states: what the reports could reach by writing exactly what the head sees.
    None for an encoder folder without a classifier head."""
    import numpy as np
    import torch
    from sklearn.metrics import f1_score

    from hf_models import ReCTForVolumeClassification, ReCTImageProcessor, ReCTVLMConfig
    from hf_models.configuration_rect import CT_RATE_ABNORMALITIES
    from trainers.classification import EASY_LABELS
    from trainers.metrics.clinical_efficacy import report_labels
    from trainers.report_training import report_datasets

    config = json.loads((encoder / "config.json").read_text())
    if "ReCTForVolumeClassification" not in (config.get("architectures") or []):
        return None
    classifier = ReCTForVolumeClassification.from_pretrained(encoder).eval()
    _, valid = report_datasets(cohort, cache, ReCTImageProcessor.from_pretrained(encoder), recipe, progress=False)
    probabilities, references = [], []
    with torch.no_grad():
        for start in range(0, len(valid), 16):
            examples = [valid[i] for i in range(start, min(start + 16, len(valid)))]
            volumes = torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])
            probabilities.append(classifier(volumes).logits.sigmoid().numpy())
            references += [e["report"] for e in examples]
    decided = np.concatenate(probabilities) >= ReCTVLMConfig().diagnosis_threshold
    truth = report_labels(references)
    names = [classifier.config.id2label[i] for i in range(classifier.config.num_labels)]
    scores = {}
    for name in EASY_LABELS:
        scores[name] = float(f1_score(truth[:, CT_RATE_ABNORMALITIES.index(name)], decided[:, names.index(name)]))
    scores["macro, five large findings"] = float(np.mean([scores[n] for n in EASY_LABELS]))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--workdir", default=None, help="keeps the cohort, the cache and the encoder between runs")
    parser.add_argument("--encoder", default=None, help="a trained ReCT encoder / classifier folder to use")
    parser.add_argument("--eval-limit", type=int, default=None, help="held-out scans to write reports for")
    parser.add_argument("--stage1-steps", type=int, default=None, help="override the recipe's stage-1 steps")
    parser.add_argument("--stage2-steps", type=int, default=None, help="override the recipe's stage-2 steps")
    parser.add_argument("--no-blind-baseline", action="store_true", help="skip the image-blind runs")
    parser.add_argument("--no-diagnosis", action="store_true", help="the projector's tokens alone, no diagnosis")
    parser.add_argument(
        "--ceiling-only", action="store_true", help="print the diagnosis head's own F1 on the held-out scans and stop"
    )
    args = parser.parse_args()

    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "rect_bench_reports").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cohort, cache = workdir / "cohort", workdir / "cache"
    params = demo_cohort_parameters()
    print(f"cohort {json.dumps(params)} → {cohort}")
    stamp = prepare_cohort(cohort, params, progress=True)
    print(f"  {stamp['volumes']} volumes ({'reused' if stamp['reused'] else 'written'})")
    encoder = encoder_folder(args, workdir, cohort, cache)

    base = ReportRecipe()
    overrides = {"stage1_steps": args.stage1_steps, "stage2_steps": args.stage2_steps}
    if args.no_diagnosis:
        overrides["diagnosis"] = False
    base = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    print(f"recipe: {json.dumps(dataclasses.asdict(base))}\nencoder: {encoder}")
    ceiling = None if args.no_diagnosis else diagnosis_ceiling(encoder, cohort, cache, base)
    if ceiling is not None:
        cells = ", ".join(f"{name} {value:.3f}" for name, value in ceiling.items())
        print(f"the diagnosis head alone (its decisions against the held-out references' findings), F1: {cells}")
    if args.ceiling_only:
        return
    variants = {"image": False} if args.no_blind_baseline else {"image": False, "image-blind": True}
    runs: dict[str, dict[str, dict]] = {name: {} for name in variants}
    for seed in args.seeds:
        for name, blind in variants.items():
            recipe = dataclasses.replace(base, seed=seed, image_blind=blind)
            start = time.perf_counter()
            summary = train_report_generator(
                cohort,
                encoder,
                workdir / f"{name}_seed_{seed}",
                recipe,
                cache_dir=cache,
                eval_limit=args.eval_limit,
                save=False,
                progress=False,
            )
            summary.pop("examples")
            summary["wall_seconds"] = round(time.perf_counter() - start, 1)
            runs[name][f"seed {seed}"] = summary
            metrics = summary["metrics"]
            print(
                f"  seed {seed} {name:11s}: F1 five {metrics['clinical_f1_macro_five']:.3f}, BLEU-4 "
                f"{metrics['bleu_4']:.3f}, ROUGE-L {metrics['rouge_l']:.3f}; {summary['seconds']} "
                f"({summary['eval_rows']} held-out scans), loss {summary['loss_history']}"
            )

    seeds = [f"seed {s}" for s in args.seeds]

    def median_of(name: str, read) -> float | None:
        values = [read(runs[name][s]["metrics"]) for s in seeds]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    median = {name: {label: median_of(name, read) for label, read in ROWS} for name in variants}
    short = {"image": "img", "image-blind": "blind"}
    columns = [f"{short[name]} {s[5:]}" for name in variants for s in seeds] + [
        f"med {short[name]}" for name in variants
    ]
    print(f"\nheld-out reports ({runs['image'][seeds[0]]['eval_rows']} scans of the valid split)")
    print(f"{'':32s} " + " ".join(f"{c:>9s}" for c in columns))
    for label, read in ROWS:
        cells = [read(runs[name][s]["metrics"]) for name in variants for s in seeds]
        cells += [median[name][label] for name in variants]
        print(f"{label:32s} " + " ".join(f"{_cell(v):>9s}" for v in cells))
    f1 = median["image"]["F1, five large findings"]
    print(f"target: median F1 over the five large findings >= 0.7: {f1:.3f} ({'met' if f1 >= 0.7 else 'NOT met'})")
    if "image-blind" in median:
        gap = f1 - median["image-blind"]["F1, five large findings"]
        print(f"target: >= 0.2 above the image-blind baseline: {gap:+.3f} ({'met' if gap >= 0.2 else 'NOT met'})")
    with_prior = median["image"]["follow-up changes, with prior"]
    without = median["image"]["follow-up changes, no prior"]
    if with_prior is not None and without is not None:
        verdict = "met" if with_prior > without else "NOT met"
        print(
            f"target: follow-up changes right more often with the prior: {with_prior:.3f} vs {without:.3f} ({verdict})"
        )
    result = {"cohort": params, "encoder": str(encoder), "recipe": dataclasses.asdict(base), "runs": runs}
    result["diagnosis_head_f1"] = ceiling
    result.update({"median": median, "targets": TARGETS})
    (workdir / "report_generation.json").write_text(json.dumps(result, indent=1))
    print(f"results → {workdir / 'report_generation.json'}")


if __name__ == "__main__":
    main()
