"""`ReCTTrainer`: the HF `Trainer` with per-module optimizer parameter groups, freezing policies, a step scheduler
and logging of each loss term a model returns.

A recipe (`trainers.recipes.load_recipe(...)`) names modules, never module paths in code: `param_groups` and `freeze`
are lists of parameter-name prefixes (`vision_model`, `text_model.encoder`) or fnmatch patterns (`*lora_*`) over
`model.named_parameters()`. On a peft model the names are matched without peft's `base_model.model.` prefix, so one
recipe serves a model with or without adapters.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_optimizer import is_optimizer_factory
from transformers.trainer_utils import _is_peft_model


#: The prefix peft puts in front of the wrapped model's parameter names (`PeftModel.base_model.model`).
PEFT_PREFIX = "base_model.model."

#: Keyword arguments with which an optimizer of `Trainer.get_optimizer_cls_and_kwargs` brings its own parameter
#: layout (GaLore, LOMO, layer-wise optimizers); such an optimizer cannot take recipe parameter groups.
_OWN_LAYOUT_KWARGS = ("params", "model", "optimizer_dict")


def _is_pattern(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def name_matches(pattern: str, name: str) -> bool:
    """True if parameter `name` is under module `pattern` (`vision_model` matches `vision_model.x.weight`, not
    `vision_model_2.weight`), or matches it as an fnmatch pattern when `pattern` holds `*`, `?` or `[`."""
    if _is_pattern(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern + ".")


def canonical_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """`model.named_parameters()` with peft's `base_model.model.` prefix removed from the names."""
    strip = _is_peft_model(model)
    return [
        (name[len(PEFT_PREFIX) :] if strip and name.startswith(PEFT_PREFIX) else name, param)
        for name, param in model.named_parameters()
    ]


def _top_level_modules(model: nn.Module) -> list[str]:
    base = model.base_model.model if _is_peft_model(model) else model
    return [name for name, _ in base.named_children()]


def _check_patterns(model: nn.Module, patterns: Iterable[str], what: str) -> None:
    names = [name for name, _ in canonical_parameters(model)]
    for pattern in patterns:
        if not any(name_matches(pattern, name) for name in names):
            raise ValueError(
                f"{what}: {pattern!r} matches no parameter of {type(model).__name__}; top-level modules: "
                f"{_top_level_modules(model)} (give a module-name prefix or an fnmatch pattern such as '*lora_*')"
            )


def freeze_modules(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set `requires_grad=False` on every parameter matching one of `patterns`; returns the frozen names.

    Raises:
        ValueError: a pattern matches no parameter (the message lists the model's top-level modules).
    """
    _check_patterns(model, patterns, "freeze")
    frozen = []
    for name, param in canonical_parameters(model):
        if any(name_matches(p, name) for p in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def _step_schedule(warmup_steps: int, step_size: int, gamma: float):
    """LR factor for optimizer step `step`: linear warm-up, then × `gamma` every `step_size` steps (torch's StepLR,
    counted in optimizer steps)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return gamma ** ((step - warmup_steps) // step_size)

    return factor


class ReCTTrainer(Trainer):
    """`Trainer` with recipe-driven parameter groups and freezing, and per-term loss logging.

    Args:
        param_groups (sequence of mappings, *optional*): `{"name": str (optional), "modules": [prefix or pattern,
            ...], "lr": float, "weight_decay": float}`. Every trainable parameter joins the first group with a
            matching entry, else the default group (`args.learning_rate`, `args.weight_decay`). Within each group,
            biases and norm weights (`Trainer.get_decay_parameter_names`) get weight decay 0. Optimizer param
            groups are named `"<name>"` and `"<name>/no_decay"`; empty ones are left out.
        freeze (sequence of str, *optional*): prefixes or patterns whose parameters are frozen
            (`requires_grad=False`) at construction, before any optimizer exists.
        lr_step (mapping, *optional*): `{"step_size": int, "gamma": float}`: a step decay schedule (seed 002's
            "step" scheduler, which `TrainingArguments.lr_scheduler_type` has no name for) after
            `args.get_warmup_steps` warm-up steps; replaces the `args.lr_scheduler_type` schedule.
        *args, **kwargs: passed to `Trainer`.

    Loss terms: every 0-d tensor in the model output under a key ending in `_loss` (`ReCTOutput.contrastive_loss`,
    `region_loss`; a localizer's `dice_loss`/`focal_loss`; a generator's `lm_loss`) is averaged over the training
    micro-batches since the last log and logged under its key next to `loss` and `grad_norm`. The total loss is the
    Trainer's, unchanged.

    Raises:
        ValueError: a `freeze` or `param_groups` entry matches no parameter, or a param group lacks `modules`/`lr`.
    """

    def __init__(
        self,
        *args,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        freeze: Sequence[str] | None = None,
        lr_step: Mapping[str, Any] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.param_groups = [self._check_group(i, g) for i, g in enumerate(param_groups or [])]
        _check_patterns(self.model, [p for g in self.param_groups for p in g["modules"]], "param_groups")
        self.frozen_parameters = freeze_modules(self.model, list(freeze or []))
        self.lr_step = dict(lr_step) if lr_step else None
        self._loss_terms: dict[str, torch.Tensor] = {}  # key → tensor([sum, count]) since the last log

    @staticmethod
    def _check_group(index: int, group: Mapping[str, Any]) -> dict[str, Any]:
        missing = [k for k in ("modules", "lr") if k not in group]
        unknown = sorted(set(group) - {"name", "modules", "lr", "weight_decay"})
        if missing or unknown:
            raise ValueError(
                f"param_groups[{index}]: missing {missing}, unknown {unknown}; allowed keys: "
                "['name', 'modules', 'lr', 'weight_decay']"
            )
        if isinstance(group["modules"], str) or not group["modules"]:
            raise ValueError(f"param_groups[{index}].modules must be a non-empty list, got {group['modules']!r}")
        return {
            "name": str(group.get("name") or f"group{index}"),
            "modules": list(group["modules"]),
            "lr": float(group["lr"]),
            "weight_decay": group.get("weight_decay"),
        }

    # ------------------------------------------------------------------------------------------------------------
    # Optimizer and scheduler
    # ------------------------------------------------------------------------------------------------------------

    def optimizer_grouped_parameters(self, model: nn.Module) -> list[dict[str, Any]]:
        """The optimizer's param groups: each recipe group then the default group, each split into decay and
        no-decay parameters; frozen parameters are left out."""
        decay_names = set(self.get_decay_parameter_names(model))
        default = {"name": "default", "lr": self.args.learning_rate, "weight_decay": self.args.weight_decay}
        specs = self.param_groups + [default]
        buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
        strip = len(PEFT_PREFIX) if _is_peft_model(model) else 0
        for full_name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            name = full_name[strip:] if strip and full_name.startswith(PEFT_PREFIX) else full_name
            index = next(
                (i for i, g in enumerate(self.param_groups) if any(name_matches(p, name) for p in g["modules"])),
                len(self.param_groups),
            )
            buckets.setdefault((index, full_name in decay_names), []).append(param)
        groups = []
        for index, spec in enumerate(specs):
            weight_decay = self.args.weight_decay if spec["weight_decay"] is None else spec["weight_decay"]
            for decay in (True, False):
                params = buckets.get((index, decay))
                if params:
                    groups.append(
                        {
                            "params": params,
                            "lr": spec["lr"],
                            "weight_decay": weight_decay if decay else 0.0,
                            "name": spec["name"] if decay else f"{spec['name']}/no_decay",
                        }
                    )
        return groups

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer class and keyword arguments (`args.optim`, `optimizer_cls_and_kwargs`) over the
        recipe's parameter groups; without recipe groups, exactly `Trainer.create_optimizer`.

        Raises:
            ValueError: the chosen optimizer builds its own parameter layout (GaLore, LOMO, layer-wise, optimizer
                factories) and cannot take parameter groups.
        """
        if not self.param_groups:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            own_layout = [k for k in _OWN_LAYOUT_KWARGS if k in optimizer_kwargs]
            if is_optimizer_factory(optimizer_cls) or own_layout:
                raise ValueError(
                    f"optim={self.args.optim!r} builds its own parameter layout ({own_layout or 'factory'}); "
                    "it cannot be combined with recipe param_groups"
                )
            self.optimizer = optimizer_cls(self.optimizer_grouped_parameters(opt_model), **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_step is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        factor = _step_schedule(
            self.args.get_warmup_steps(num_training_steps),
            int(self.lr_step["step_size"]),
            float(self.lr_step["gamma"]),
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------------------------------------------------
    # Loss terms
    # ------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self._accumulate_loss_terms(outputs)
        return (loss, outputs) if return_outputs else loss

    def _accumulate_loss_terms(self, outputs: Any) -> None:
        if not isinstance(outputs, Mapping):
            return
        for key, value in outputs.items():
            if key.endswith("_loss") and isinstance(value, torch.Tensor) and value.dim() == 0:
                entry = torch.stack([value.detach().float(), torch.ones((), device=value.device)])
                self._loss_terms[key] = self._loss_terms[key] + entry if key in self._loss_terms else entry

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean of each loss term since the last training log to a training log (one with `loss`)."""
        if "loss" in logs and self._loss_terms:
            for key, entry in self._loss_terms.items():
                total, count = self.accelerator.reduce(entry, reduction="sum").tolist()
                logs[key] = round(total / count, 4)
            self._loss_terms = {}
        super().log(logs, start_time)
