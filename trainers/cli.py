"""`rect-vlm` console script.

One function registers each subcommand's arguments (`add_<name>_parser`) and one runs it (`run_<name>`);
`COMMANDS` lists them and `main` wires them into argparse. To add a subcommand, write the two functions and
append a `(name, help, add_parser, run)` entry to `COMMANDS`. Heavy imports happen inside the run functions so
that `rect-vlm --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence


# ----------------------------------------------------------------------------------------------------------------
# synth: phantom CT-RATE cohort
# ----------------------------------------------------------------------------------------------------------------


def add_synth_parser(parser: argparse.ArgumentParser) -> None:
    from_default = "(default: %(default)s)"
    parser.add_argument("--out", required=True, help="cohort root folder to write (created if missing)")
    parser.add_argument("--n-train", type=int, default=8, help=f"training patients {from_default}")
    parser.add_argument("--n-val", type=int, default=4, help=f"validation patients {from_default}")
    parser.add_argument("--seed", type=int, default=0, help=f"random seed; same seed → identical files {from_default}")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("D", "H", "W"),
        default=[64, 128, 128],
        help=f"voxels per volume: slices, rows, columns {from_default}",
    )
    parser.add_argument(
        "--p-prior", type=float, default=0.35, help=f"fraction of patients with a follow-up scan {from_default}"
    )
    parser.add_argument(
        "--p-second-recon",
        type=float,
        default=0.15,
        help=f"fraction of scans with a second reconstruction {from_default}",
    )
    parser.add_argument(
        "--prevalence",
        type=float,
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
    from trainers.data.phantom import generate_cohort

    for name in ("n_train", "n_val"):
        if getattr(args, name) < 0:
            raise SystemExit(f"rect-vlm synth: --{name.replace('_', '-')} must be >= 0")
    summary = generate_cohort(
        args.out,
        n_train=args.n_train,
        n_val=args.n_val,
        seed=args.seed,
        shape=tuple(args.shape),
        p_prior=args.p_prior,
        p_second_recon=args.p_second_recon,
        prevalence=args.prevalence,
        vary_depth=args.vary_depth,
        seg_target=args.seg_target,
    )
    print(json.dumps(summary, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# train-classifier: fine-tune ReCTForVolumeClassification on a CT-RATE-layout cohort
# ----------------------------------------------------------------------------------------------------------------


def add_train_classifier_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort", required=True, help="cohort root (holds dataset/ and masks/)")
    parser.add_argument("--out", required=True, help="output folder: model/, summary.json, cache/")
    parser.add_argument("--labels", nargs="+", default=None, help="label names (default: the 5 easy phantom labels)")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention-type", choices=["divided", "joint"], default="divided")


def run_train_classifier(args: argparse.Namespace) -> int:
    from trainers.classification import ClassifierRecipe, train_classifier

    recipe = ClassifierRecipe(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        attention_type=args.attention_type,
    )
    if args.labels:
        recipe.label_names = tuple(args.labels)
    summary = train_classifier(args.cohort, args.out, recipe)
    print(json.dumps({k: summary[k] for k in ("train_loss", "train_seconds", "valid_auroc")}, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# demo: the main job end to end
# ----------------------------------------------------------------------------------------------------------------


def add_demo_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_output", help="working folder (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps (default: the recipe's)")


def run_demo(args: argparse.Namespace) -> int:
    from trainers.demo import run_demo as demo

    demo(args.out, max_steps=args.max_steps)
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
        "demo",
        "synthesise a cohort, fine-tune a classifier, save a Hub folder and reload it in a fresh process",
        add_demo_parser,
        run_demo,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rect-vlm", description="ReCT-VLM: 3D CT vision-language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text, add, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
