"""Declarative key mapping with strict accounting (timm's `checkpoint_filter_fn`, written as data).

A `KeyMapping` is a list of rules over source keys plus the target keys that may stay at initialisation:

- `Rename(source, target, transform)`: a source key matching the regex `source` (whole key) becomes `target`
  (a `re` replacement template, `\\1` etc.); `transform` reshapes the tensor. `target` may be a tuple of
  templates, with `transform` returning one tensor per template (a fused qkv split into q, k, v).
- `Drop(source, reason)`: a source key that is intentionally not converted, and why.
- `initialized`: `{regex: reason}` for target keys no source key provides (a new head, region queries).

`KeyMapping.apply` maps every source key through the first rule that matches it. It fails (`ConversionError`,
naming the keys) on a source key no rule matches, two source keys landing on one target, a target key that does not
exist or has another shape, and a target key left unset that no `initialized` entry allows. Nothing is ever loaded
non-strictly: the result is a complete state dict for `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .readers import ConversionError


Transform = Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Rename:
    source: str
    target: str | tuple[str, ...]
    transform: Transform | None = None


@dataclass(frozen=True)
class Drop:
    source: str
    reason: str


@dataclass
class ConversionReport:
    """What a conversion did with every key: `mapped` (source → target, or targets for a split), `dropped`
    (source → reason), `initialized` (target → reason) and free-form `notes` (e.g. behaviour that differs)."""

    mapped: dict[str, str | list[str]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    initialized: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"mapped": self.mapped, "dropped": self.dropped, "initialized": self.initialized, "notes": self.notes}

    def mapped_targets(self) -> list[str]:
        """Every target key a source key was mapped to."""
        return [t for v in self.mapped.values() for t in ([v] if isinstance(v, str) else v)]

    def summary(self) -> str:
        return (
            f"{len(self.mapped)} source keys mapped, {len(self.dropped)} dropped (with reasons), "
            f"{len(self.initialized)} target keys left at initialisation"
        )


@dataclass
class KeyMapping:
    rules: list[Rename | Drop]
    initialized: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def apply(
        self, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], allow_unknown_targets: bool = False
    ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
        """Map `source` onto the keys and shapes of `target` (a model's `state_dict()`); returns the complete
        state dict to load (initialised entries taken from `target`) and the report. `allow_unknown_targets` only
        renames (the caller checks the result, e.g. LoRA tensors against the layers they adapt)."""
        report = ConversionReport(notes=list(self.notes))
        out: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        unexpected: list[str] = []
        for key, tensor in source.items():
            rule = next((r for r in self.rules if re.fullmatch(r.source, key)), None)
            if rule is None:
                unexpected.append(key)
                continue
            if isinstance(rule, Drop):
                report.dropped[key] = rule.reason
                continue
            templates = (rule.target,) if isinstance(rule.target, str) else rule.target
            names = [re.sub(rf"^(?:{rule.source})$", t, key) for t in templates]
            values = rule.transform(tensor) if rule.transform is not None else tensor
            values = (values,) if isinstance(values, torch.Tensor) else tuple(values)
            if len(values) != len(names):
                raise ConversionError(
                    f"rule for {key!r} makes {len(values)} tensors for {len(names)} target keys {names}"
                )
            for name, value in zip(names, values):
                if allow_unknown_targets:
                    if name in origin:
                        raise ConversionError(f"source keys {origin[name]!r} and {key!r} both map to {name!r}")
                    origin[name] = key
                    out[name] = value.contiguous()
                    continue
                if name not in target:
                    raise ConversionError(f"source key {key!r} maps to {name!r}, which the target model does not have")
                if tuple(value.shape) != tuple(target[name].shape):
                    raise ConversionError(
                        f"source key {key!r} (shape {tuple(tensor.shape)}) maps to {name!r} with shape "
                        f"{tuple(value.shape)}, but the target expects {tuple(target[name].shape)}; the target config "
                        "does not match the checkpoint"
                    )
                if name in origin:
                    raise ConversionError(f"source keys {origin[name]!r} and {key!r} both map to {name!r}")
                origin[name] = key
                out[name] = value.to(target[name].dtype).contiguous()
            report.mapped[key] = names[0] if len(names) == 1 else names
        if unexpected:
            raise ConversionError(
                f"{len(unexpected)} source key(s) match no mapping rule (unexpected): {unexpected[:8]}"
                + (" …" if len(unexpected) > 8 else "")
                + "; convert a checkpoint of the layout this format expects, or add a rule"
            )
        missing = []
        for name, tensor in target.items():
            if name in out:
                continue
            reason = next((r for pattern, r in self.initialized.items() if re.fullmatch(pattern, name)), None)
            if reason is None:
                missing.append(name)
            else:
                report.initialized[name] = reason
                out[name] = tensor
        if missing:
            raise ConversionError(
                f"{len(missing)} target key(s) get no value from the checkpoint (missing): {missing[:8]}"
                + (" …" if len(missing) > 8 else "")
            )
        return out, report


def identity_mapping(initialized: dict[str, str] | None = None) -> KeyMapping:
    """Every source key maps to the target key of the same name (a ReCT checkpoint in its own naming)."""
    return KeyMapping([Rename(r"(.+)", r"\1")], initialized=dict(initialized or {}))
