"""Training code for the ReCT models: `ReCTTrainer`, YAML `recipes`, `metrics`, data readers and the CLI.

Imports are lazy (PEP 562 `__getattr__`): `import trainers` loads no torch or transformers; `from trainers import
ReCTTrainer, recipes, metrics` imports each on first use.
"""

import importlib


#: Public name → (submodule, attribute in it or None for the submodule itself).
_LAZY = {
    "ReCTTrainer": ("trainers.trainer", "ReCTTrainer"),
    "load_recipe": ("trainers.recipes", "load_recipe"),
    "recipes": ("trainers.recipes", None),
    "metrics": ("trainers.metrics", None),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'trainers' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
