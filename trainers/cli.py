"""`rect-vlm` console script.

One function registers each subcommand's arguments (`add_<name>_parser`) and one runs it (`run_<name>`);
`COMMANDS` lists them and `main` wires them into argparse. To add a subcommand, write the two functions and
append a `(name, help, add_parser, run)` entry to `COMMANDS`. Heavy imports happen inside the run functions so
that `rect-vlm --help` stays fast.

Errors: a mistake in what the user asked for (a bad argument value, a missing or empty input folder, an output
folder that cannot be written, a malformed dataset) is printed as ONE line that names the argument or path and
says what was expected, and the exit code is 2, as argparse does for its own errors. `--debug` shows the
traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


#: Exit code of a user's mistake (argparse uses the same).
USAGE_EXIT_CODE = 2


class UsageError(ValueError):
    """A mistake in what the user asked for; its message names the argument or path and what was expected."""


class CommandFailed(RuntimeError):
    """A command could not finish for a reason its message explains in full (exit code 1, no traceback)."""


# ----------------------------------------------------------------------------------------------------------------
# Quiet imports
# ----------------------------------------------------------------------------------------------------------------


def short_openmp_spin() -> None:
    """Let torch's idle OpenMP threads spin only briefly before they sleep (`GOMP_SPINCOUNT=5000`), unless the user
    set `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`.

    Why: a training step is hundreds of small parallel regions. libgomp's default keeps idle threads spinning for
    300,000 iterations after each one, so with as many threads as cores and any other job running, spinning threads
    take the cores the working ones need; letting them sleep at once (`OMP_WAIT_POLICY=PASSIVE`) makes every region
    pay a wake-up instead. 150 steps of the demo's classifier on two cores, alone / beside a second such run:
    default 18.0 s / 241 s, `PASSIVE` 26.5 s / 36.5 s, `GOMP_SPINCOUNT=5000` 19.6 s / 48.2 s.
    libgomp reads the variables once, when torch loads it, so this runs before anything imports torch.
    """
    if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
        os.environ["GOMP_SPINCOUNT"] = "5000"


def name_deepspeed_accelerator() -> None:
    """Tell DeepSpeed it runs on the CPU (`DS_ACCELERATOR=cpu`) on a machine without CUDA, unless the user chose.

    Why: transformers imports DeepSpeed whenever it is installed, even for single-process runs, and DeepSpeed then
    guesses its accelerator and warns "Setting accelerator to CPU. If you have GPU or other accelerator, we were
    unable to detect it." in every process. Naming the accelerator is what that message asks for.
    """
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_optional_kernel_probe() -> None:
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" import-time warning.

    Why: `transformers.Trainer` imports peft, which imports bitsandbytes; on a CPU with AVX512-BF16,
    `bitsandbytes/backends/cpu/ops.py` then tries, at import, to fetch an optional 4-bit matmul kernel from the Hub
    through the `kernels` package and logs a warning when it cannot (package absent, or `HF_HUB_OFFLINE=1`).
    bitsandbytes has no setting that skips the probe, and the fallback it uses instead is its own native kernel;
    nothing here runs 4-bit CPU matmuls. So the one message is filtered, by its logger and its exact prefix,
    before bitsandbytes is imported; every other bitsandbytes message still shows. The same probe makes `kernels`
    log "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'" when the Hub is offline;
    that one message is filtered the same way.
    """
    for name, prefix in (
        ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
        (
            "kernels._internals.hf_hub",
            "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
        ),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


# ----------------------------------------------------------------------------------------------------------------
# Argument types and path checks (each names what it expected)
# ----------------------------------------------------------------------------------------------------------------


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _integer(text, 0)


def voxel_count(text: str) -> int:
    """argparse type: a volume size along one axis, >= 4 voxels (the phantom's smallest drawable size)."""
    return _integer(text, 4)


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def writable_folder(path: str | os.PathLike, argument: str) -> Path:
    """Create `path` (with parents) if needed and check that a file can be written in it.

    Raises:
        UsageError: the folder cannot be created or written to (the message names `argument` and the path).
    """
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{argument} {str(folder)!r}: is a file; expected a folder to write into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UsageError(
            f"{argument} {str(folder)!r}: cannot write there ({reason}); "
            "expected a folder that can be created and written to"
        ) from err
    return folder


def cohort_folder(path: str | os.PathLike, argument: str) -> Path:
    """Check that `path` is a CT-RATE-layout cohort root (holds `dataset/`), as `rect-vlm synth` writes.

    Raises:
        UsageError: the folder is missing, is a file, is empty, or holds no `dataset/` folder.
    """
    folder = Path(path).expanduser()
    expected = "expected a cohort root holding dataset/ (write one with `rect-vlm synth --out DIR`)"
    if not folder.exists():
        raise UsageError(f"{argument} {str(folder)!r}: no such folder; {expected}")
    if not folder.is_dir():
        raise UsageError(f"{argument} {str(folder)!r}: is a file; {expected}")
    if not any(folder.iterdir()):
        raise UsageError(f"{argument} {str(folder)!r}: folder is empty; {expected}")
    if not (folder / "dataset").is_dir():
        raise UsageError(f"{argument} {str(folder)!r}: has no dataset/ folder; {expected}")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# synth: phantom CT-RATE cohort
# ----------------------------------------------------------------------------------------------------------------


def add_synth_parser(parser: argparse.ArgumentParser) -> None:
    from_default = "(default: %(default)s)"
    parser.add_argument("--out", required=True, help="cohort root folder to write (created if missing)")
    parser.add_argument("--n-train", type=non_negative_int, default=8, help=f"training patients {from_default}")
    parser.add_argument("--n-val", type=non_negative_int, default=4, help=f"validation patients {from_default}")
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help=f"random seed; same seed → identical files {from_default}"
    )
    parser.add_argument(
        "--shape",
        type=voxel_count,
        nargs=3,
        metavar=("D", "H", "W"),
        default=[64, 128, 128],
        help=f"voxels per volume: slices, rows, columns {from_default}",
    )
    parser.add_argument(
        "--p-prior", type=probability, default=0.35, help=f"fraction of patients with a follow-up scan {from_default}"
    )
    parser.add_argument(
        "--p-second-recon",
        type=probability,
        default=0.15,
        help=f"fraction of scans with a second reconstruction {from_default}",
    )
    parser.add_argument(
        "--prevalence",
        type=probability,
        default=None,
        help="one prevalence for all 18 abnormalities (default: the per-label table)",
    )
    parser.add_argument("--vary-depth", action="store_true", help="vary the number of slices per volume by ±15%%")
    parser.add_argument(
        "--seg-target",
        default="Pleural effusion",
        help=f"abnormality whose binary masks back the segmentation CSV {from_default}",
    )


def run_synth(args: argparse.Namespace) -> int:
    out = writable_folder(args.out, "--out")
    from trainers.data.phantom import LESION_IDS, generate_cohort

    if args.seg_target not in LESION_IDS:
        raise UsageError(f"--seg-target {args.seg_target!r}: expected one of {list(LESION_IDS)}")
    summary = generate_cohort(
        out,
        n_train=args.n_train,
        n_val=args.n_val,
        seed=args.seed,
        shape=tuple(args.shape),
        p_prior=args.p_prior,
        p_second_recon=args.p_second_recon,
        prevalence=args.prevalence,
        vary_depth=args.vary_depth,
        seg_target=args.seg_target,
        progress=True,
    )
    print(json.dumps(summary, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# train-classifier: fine-tune ReCTForVolumeClassification on a CT-RATE-layout cohort
# ----------------------------------------------------------------------------------------------------------------


def add_train_classifier_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort", required=True, help="cohort root (holds dataset/ and masks/)")
    parser.add_argument("--out", required=True, help="output folder: model/, summary.json, cache/")
    parser.add_argument("--labels", nargs="+", default=None, help="label names (default: the recipe's)")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="batch size (default: the recipe's)")
    parser.add_argument(
        "--learning-rate", type=positive_float, default=None, help="peak learning rate (default: the recipe's)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--attention-type", choices=["divided", "joint"], default=None)


def run_train_classifier(args: argparse.Namespace) -> int:
    cohort = cohort_folder(args.cohort, "--cohort")
    out = writable_folder(args.out, "--out")
    from hf_models import CT_RATE_ABNORMALITIES
    from trainers.classification import ClassifierRecipe, train_classifier

    overrides = {
        name: getattr(args, name)
        for name in ("max_steps", "batch_size", "learning_rate", "attention_type")
        if getattr(args, name) is not None
    }
    if args.labels:
        unknown = [n for n in args.labels if n not in CT_RATE_ABNORMALITIES]
        if unknown:
            raise UsageError(f"--labels: unknown label name(s) {unknown}; expected names from {CT_RATE_ABNORMALITIES}")
        overrides["label_names"] = tuple(args.labels)
    recipe = ClassifierRecipe(seed=args.seed, **overrides)
    summary = train_classifier(cohort, out, recipe)
    print(json.dumps({k: summary[k] for k in ("train_loss", "train_seconds", "valid_auroc")}, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# train: any recipe (`trainers/recipes/*.yaml`) through `trainers.train.train_from_recipe`
# ----------------------------------------------------------------------------------------------------------------


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="use the recipe's `tiny:` section (a CPU run of minutes)")
    parser.add_argument("--data", default=None, help="dataset root (required; CT-RATE layout for classification)")
    parser.add_argument(
        "--output-dir", default=None, help="checkpoints, final model and training_summary.json (required)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint-N in --output-dir"
    )


def add_train_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", metavar="RECIPE", help="a shipped recipe name (classification, ...) or a .yaml file")
    _add_train_options(parser)
    # Everything after RECIPE lands here, the options above included (argparse gives a trailing REMAINDER
    # positional all that follows); `run_train` parses it again. `TrainingArguments` has ~150 fields: declaring
    # them here would import transformers for every `rect-vlm --help`.
    parser.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="--KEY VALUE",
        help="TrainingArguments overrides in HfArgumentParser form, after RECIPE (--max_steps 30 --save_steps 5 "
        "--seed 0; `RECIPE --help` lists them)",
    )


class _RaisingParser(argparse.ArgumentParser):
    """argparse whose errors are `UsageError`s (the messages name the argument)."""

    def error(self, message: str):
        raise UsageError(message)


_NEGATIVE_NUMBER = re.compile(r"^-\d")


def _training_arguments_parser() -> argparse.ArgumentParser:
    """`HfArgumentParser(TrainingArguments)` whose errors are `UsageError`s."""
    from transformers import HfArgumentParser, TrainingArguments

    class OverrideParser(HfArgumentParser):
        def error(self, message: str):
            raise UsageError(f"TrainingArguments override: {message}")

    return OverrideParser(TrainingArguments, prog="rect-vlm train RECIPE [options] [--KEY VALUE ...]")


def training_argument_overrides(tokens: Sequence[str]) -> dict:
    """`--key value` / `--key=value` / `--flag` tokens → `{TrainingArguments field: typed value}`, parsed as
    `HfArgumentParser(TrainingArguments)` parses them; only the keys given appear.

    Raises:
        UsageError: a key that is not a `TrainingArguments` field (named), a value of the wrong type, a stray token.
    """
    parser = _training_arguments_parser()
    keys = []
    for token in tokens:
        if not token.startswith("-") or _NEGATIVE_NUMBER.match(token):  # a value
            if not keys:
                raise UsageError(f"unexpected argument {token!r} after RECIPE: expected --KEY VALUE overrides")
            continue
        name = token.split("=", 1)[0]
        if name in ("--output_dir", "--output-dir"):
            raise UsageError(f"{name}: give the output folder as --output-dir before any override")
        action = parser._option_string_actions.get(name)
        if action is None or not name.startswith("--"):
            raise UsageError(
                f"{name}: not a TrainingArguments field; expected overrides such as --max_steps 30 --save_steps 5 "
                "(see `rect-vlm train RECIPE --help`)"
            )
        keys.append(action.dest)
    namespace, extra = parser.parse_known_args(list(tokens))
    if extra:
        raise UsageError(f"unexpected argument(s) {extra}: expected --KEY VALUE overrides")
    return {key: getattr(namespace, key) for key in keys}


def run_train(args: argparse.Namespace) -> int:
    inner = _RaisingParser(add_help=False, allow_abbrev=False)
    _add_train_options(inner)
    # Options after RECIPE override those before it; the rest are TrainingArguments overrides.
    args, rest = inner.parse_known_args(args.overrides, namespace=args)
    if "-h" in rest or "--help" in rest:  # `rect-vlm train RECIPE --help` lists the overrides
        _training_arguments_parser().print_help()
        return 0
    for option, value in (("--data", args.data), ("--output-dir", args.output_dir)):
        if value is None:
            raise UsageError(f"{option} is required")
    from trainers.recipes import load_recipe

    try:
        recipe = load_recipe(args.recipe, tiny=args.tiny)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"RECIPE: {err}") from err
    overrides = training_argument_overrides(rest)  # before any folder is created
    data = cohort_folder(args.data, "--data")
    output_dir = writable_folder(args.output_dir, "--output-dir")
    from trainers.train import checkpoints, train_from_recipe

    earlier = checkpoints(output_dir)
    if earlier and not args.resume:
        raise UsageError(
            f"--output-dir {str(output_dir)!r}: holds {earlier[0].name} of an earlier run; "
            "expected --resume to continue it, or another folder"
        )

    from trainers.distributed import finish_distributed

    summary = train_from_recipe(recipe, data, output_dir, tiny=args.tiny, resume=args.resume, overrides=overrides)
    finish_distributed()
    keys = ("global_step", "resumed_from", "train_loss", "wall_seconds", "best_metric")
    if int(os.environ.get("RANK", "0")) == 0:  # one summary for a multi-process run
        print(json.dumps({k: summary[k] for k in keys}, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# demo: the main job end to end
# ----------------------------------------------------------------------------------------------------------------


def add_demo_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default="demo_out",
        help="working folder; a second run reuses its cohort and cache (default: %(default)s)",
    )
    parser.add_argument("--n-train", type=positive_int, default=None, help="training patients (default: the demo's)")
    parser.add_argument("--n-val", type=positive_int, default=None, help="held-out patients (default: the demo's)")
    parser.add_argument(
        "--shape",
        type=voxel_count,
        nargs=3,
        metavar=("D", "H", "W"),
        default=None,
        help="voxels per generated volume (default: the demo's)",
    )
    parser.add_argument("--seed", type=non_negative_int, default=None, help="cohort and training seed")
    parser.add_argument(
        "--prevalence", type=probability, default=None, help="one prevalence for every finding (default: the demo's)"
    )
    parser.add_argument("--max-steps", type=positive_int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="batch size (default: the recipe's)")
    parser.add_argument(
        "--report-steps",
        type=positive_int,
        nargs=2,
        metavar=("STAGE1", "STAGE2"),
        default=None,
        help="report generator: projector steps, then LoRA steps (default: ReportRecipe's stage1_steps and "
        "stage2_steps, as the bench's)",
    )
    parser.add_argument(
        "--report-scans", type=positive_int, default=None, help="held-out scans the report generator writes for"
    )
    parser.add_argument("--no-report", action="store_true", help="skip the report-generation stage")
    parser.add_argument(
        "--localization-steps",
        type=positive_int,
        default=None,
        help="localizer training steps (default: trainers.demo.LOCALIZATION_STEPS)",
    )
    parser.add_argument(
        "--localization-scans", type=positive_int, default=None, help="held-out scans the localizer writes masks for"
    )
    parser.add_argument("--no-localization", action="store_true", help="skip the localization stage")


def run_demo(args: argparse.Namespace) -> int:
    out = writable_folder(args.out, "--out")
    from trainers.demo import run_demo as demo

    demo(
        out,
        n_train=args.n_train,
        n_val=args.n_val,
        shape=tuple(args.shape) if args.shape else None,
        seed=args.seed,
        prevalence=args.prevalence,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        report=not args.no_report,
        report_steps=args.report_steps,
        report_scans=args.report_scans,
        localization=not args.no_localization,
        localization_steps=args.localization_steps,
        localization_scans=args.localization_scans,
    )
    return 0


def add_convert_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint file (.pt/.pth/.bin/.ckpt/.safetensors) or folder (DeepSpeed, PEFT)")
    parser.add_argument(
        "--format",
        default="auto",
        choices=("auto", "raw", "lightning", "deepspeed", "peft", "rect-tree", "monai-vit", "sam-med3d", "llava"),
        help="source layout (default: detected from the file or folder)",
    )
    parser.add_argument("--out", required=True, help="output folder (absent or empty unless --overwrite)")
    parser.add_argument(
        "--config",
        default=None,
        help="target config.json (file, folder, or inline JSON): the model the keys belong to (raw, lightning, "
        "deepspeed; the base model for peft), overrides for monai-vit / sam-med3d, or for rect-tree "
        '{"vision_encoder": PATH, ...} where the tree has no <component>/config.json',
    )
    parser.add_argument(
        "--source-config",
        default=None,
        help="upstream constructor arguments as JSON (file or inline), e.g. MONAI ViT's img_size, patch_size, ...",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="read pickles that construct arbitrary objects (runs code from the file: only for files you trust)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new one is done")


def run_convert(args: argparse.Namespace) -> int:
    from conversion import convert

    result = convert(
        args.src,
        args.out,
        format=args.format,
        config=args.config,
        source_config=args.source_config,
        trust_pickle=args.trust_pickle,
        overwrite=args.overwrite,
    )
    print(f"converted {args.src} → {result.out}: {result.report.summary()}")
    for name, report in (result.components or {}).items():
        print(f"  {name}/: {report.summary()}")
    for source, reason in result.report.dropped.items():
        print(f"  dropped {source}: {reason}")
    for target, reason in result.report.initialized.items():
        print(f"  initialised {target}: {reason}")
    for note in result.report.notes:
        print(f"  note: {note}")
    reports = [f"{name}/conversion_report.json" for name in result.components] if result.components else None
    print(
        f"report: {result.out / 'conversion_report.json'}"
        if reports is None
        else f"reports in {result.out}: {reports}"
    )
    return 0


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected COMPONENT=PATH, got {text!r}")
    return key, value


#: `conversion.release.COMPONENTS` (key → repo name), listed here so that `--help` imports nothing heavy.
RELEASE_COMPONENTS = {
    "vision-encoder": "ReCT-VisionEncoder",
    "classifier": "ReCT-Classifier",
    "localizer": "ReCT-Localizer",
    "vlm-small": "ReCT-VLM-Small",
}


def add_release_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--org", required=True, help="Hub organisation or user the repos belong to")
    parser.add_argument("--out", default="hub", help="staging folder: <out>/<org>/<repo>/ per component")
    for key, repo in RELEASE_COMPONENTS.items():
        parser.add_argument(f"--{key}", default=None, metavar="FOLDER", help=f"folder to release as {repo}")
    parser.add_argument(
        "--eval",
        type=key_value,
        action="append",
        default=[],
        metavar="COMPONENT=JSON",
        help="evaluation JSON for a component's card (default: eval_results.json in its folder)",
    )
    parser.add_argument(
        "--base-model", type=key_value, action="append", default=[], metavar="COMPONENT=REPO", help="card base_model"
    )
    parser.add_argument(
        "--config-only",
        nargs="*",
        choices=("medium", "large"),
        default=[],
        help="also stage configs-only repos ReCT-VLM-Medium / ReCT-VLM-Large (config, code and card, no weights)",
    )
    parser.add_argument("--version", default="v0.1.0", help="tag created on every repo")
    parser.add_argument("--scan", default=None, help="CT scan every staged folder is verified on (default: random)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", dest="dry_run", action="store_true", default=True, help="plan only (default)")
    mode.add_argument("--upload", dest="dry_run", action="store_false", help="upload to the Hub (needs a token)")
    parser.add_argument("--public", action="store_true", help="create public repos (default: private)")
    parser.add_argument("--gated", choices=("auto", "manual"), default=None, help="gate access to the repos")
    parser.add_argument("--revision", default=None, help="branch to upload to (default: main)")


def run_release(args: argparse.Namespace) -> int:
    from conversion.release import release

    components = {key: getattr(args, key.replace("-", "_")) for key in RELEASE_COMPONENTS}
    components = {key: folder for key, folder in components.items() if folder is not None}
    result = release(
        components,
        args.out,
        args.org,
        version=args.version,
        evaluations=dict(args.eval),
        base_models=dict(args.base_model),
        scan=args.scan,
        config_only=args.config_only,
        dry_run=args.dry_run,
        private=not args.public,
        gated=args.gated,
        revision=args.revision,
    )
    for repo, check in zip(result["staged"], result["verified"]):
        if check["max_abs_diff"] is None:
            print(
                f"staged {repo.repo_id} → {repo.folder}: configs only, {check['class']} of "
                f"{check['parameters'] / 1e9:.2f}B parameters built on the meta device in a fresh process"
            )
            continue
        print(
            f"staged {repo.repo_id} → {repo.folder}: fresh-process {check['class']} max |Δ| "
            f"{check['max_abs_diff']:.1e}" + (f"; left out {repo.left_out}" if repo.left_out else "")
        )
    for step in result["plan"]:
        detail = {k: v for k, v in step.items() if k not in ("call", "files")}
        print(f"{'called' if result['uploaded'] else 'would call'} HfApi.{step['call']}({detail})")
        for file in step.get("files", []):
            print(f"    {file['path']:40s} {file['bytes']:>12,d} bytes")
    if not result["uploaded"]:
        print(f"dry run: nothing was sent; the plan is in {Path(args.out) / args.org / 'release_plan.json'}")
    return 0


def add_download_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="component repo name (ReCT-Classifier) or key (classifier)")
    parser.add_argument("--org", required=True)
    parser.add_argument("--revision", default=None, help="tag or branch, e.g. v0.1.0")
    parser.add_argument("--cache-dir", default=None)


def run_download(args: argparse.Namespace) -> int:
    from conversion.release import download

    print(download(args.name, args.org, args.revision, args.cache_dir))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Registry and entry point
# ----------------------------------------------------------------------------------------------------------------

#: (name, help, add_parser, run) per subcommand.
COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = [
    (
        "synth",
        "write a phantom chest-CT cohort in CT-RATE layout (+ OmniAbnorm, segmentation CSV, Libra JSON)",
        add_synth_parser,
        run_synth,
    ),
    (
        "train-classifier",
        "fine-tune ReCTForVolumeClassification on a CT-RATE-layout cohort with the HF Trainer",
        add_train_classifier_parser,
        run_train_classifier,
    ),
    (
        "train",
        "train a recipe (trainers/recipes/*.yaml) with ReCTTrainer; --resume continues from the last good checkpoint",
        add_train_parser,
        run_train,
    ),
    (
        "convert",
        "convert a raw checkpoint (plain, Lightning, DeepSpeed, PEFT, MONAI ViT, SAM-Med3D) into a Hub folder",
        add_convert_parser,
        run_convert,
    ),
    (
        "release",
        "stage component Hub repos with model cards, verify them in a fresh process, upload (dry run by default)",
        add_release_parser,
        run_release,
    ),
    (
        "download",
        "download a released component (snapshot_download by name and revision)",
        add_download_parser,
        run_download,
    ),
    (
        "demo",
        "synthesise a cohort, fine-tune a classifier, save a Hub folder and reload it in a fresh process",
        add_demo_parser,
        run_demo,
    ),
]


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad argument prints one line (no usage block) and points to `--help`; exit code 2."""

    def error(self, message: str):
        self.exit(USAGE_EXIT_CODE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="rect-vlm", description="ReCT-VLM: 3D CT vision-language models.")
    debug_help = "show the full traceback of any error"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text, add, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        # Also accepted after the subcommand; SUPPRESS keeps the global value when it is not repeated there.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        p.set_defaults(_run=run)
    return parser


def _user_error_message(err: BaseException) -> str | None:
    """The one-line message for a user's mistake, or None when `err` is not one."""
    if isinstance(err, UsageError):
        return str(err)
    conversion = sys.modules.get("conversion.readers")
    if conversion is not None and isinstance(err, conversion.ConversionError):
        return str(err)
    # Dataset errors can only come from the readers once they are imported; checking `sys.modules` keeps this
    # module free of their heavy imports.
    readers = sys.modules.get("trainers.data.readers")
    if readers is not None and isinstance(err, readers.MissingFilesError):
        path, reason = err.problems[0]
        return f"{len(err.problems)} file(s) are missing or unreadable, e.g. {path}: {reason}"
    if readers is not None and isinstance(err, readers.DatasetFormatError):
        return str(err).splitlines()[0]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    short_openmp_spin()
    name_deepspeed_accelerator()
    silence_optional_kernel_probe()
    # Progress bars go to stderr; line-buffered stdout keeps the report lines in order with them in a log file.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"rect-vlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except CommandFailed as err:
        if args.debug:
            raise
        print(f"rect-vlm {args.command}: failed: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        message = _user_error_message(err)
        if message is None or args.debug:
            raise
        print(f"rect-vlm {args.command}: error: {message}", file=sys.stderr)
        return USAGE_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
