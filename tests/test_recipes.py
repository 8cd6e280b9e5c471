"""Recipes (`trainers/recipes/*.yaml` → `load_recipe`) and `ReCTTrainer` (parameter groups, freezing, loss terms) on
tiny `ReCTModel`s: real Trainer runs of a few steps on random inputs."""

import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from hf_models import ReCTConfig, ReCTModel
from tests.test_modeling import make_batch
from trainers import ReCTTrainer
from trainers.recipes import RECIPE_NAMES, load_recipe, recipe_path


# ----------------------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tiny", [False, True], ids=["full", "tiny"])
@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_every_recipe_loads_and_builds_training_arguments(name, tiny, tmp_path):
    recipe = load_recipe(name, tiny=tiny)
    opt = recipe.optimization
    args = recipe.training_arguments(tmp_path, use_cpu=True)
    assert args.learning_rate == opt.lr and args.weight_decay == opt.weight_decay
    assert args.per_device_train_batch_size == opt.batch_size
    assert args.gradient_accumulation_steps == opt.gradient_accumulation_steps
    assert args.seed == opt.seed and args.max_grad_norm == opt.max_grad_norm
    if opt.max_steps is not None:
        assert args.max_steps == opt.max_steps
    else:
        assert args.num_train_epochs == opt.epochs
    assert not args.bf16 and not args.fp16  # no CUDA here, whatever the recipe asks for
    expected_scheduler = {"plateau": "reduce_lr_on_plateau", "step": "constant"}.get(opt.scheduler, opt.scheduler)
    if opt.scheduler == "cosine" and opt.min_lr is not None:
        expected_scheduler = "cosine_with_min_lr"
        assert args.lr_scheduler_kwargs == {"min_lr_rate": pytest.approx(opt.min_lr / opt.lr)}
    assert args.lr_scheduler_type.value == expected_scheduler
    if tiny:  # a tiny run is short: a step budget or a few epochs
        assert (opt.max_steps or 0) <= 50 and (opt.epochs or 0) <= 5


def test_full_recipes_carry_the_seed_hyper_parameters():
    vision = load_recipe("vision_pretrain")
    assert (vision.optimization.lr, vision.optimization.weight_decay, vision.optimization.min_lr) == (1e-4, 0.05, 1e-6)
    assert (vision.losses.region, vision.losses.temperature) == (0.5, 0.07)
    localization = load_recipe("localization")
    opt = localization.optimization
    assert (opt.lr, opt.weight_decay, opt.batch_size, opt.gradient_accumulation_steps) == (1e-4, 1e-4, 2, 4)
    assert opt.scheduler == "plateau" and localization.early_stopping.patience == 15
    assert [type(c).__name__ for c in localization.callbacks()] == ["EarlyStoppingCallback"]
    stage1 = load_recipe("report_stage1")
    assert stage1.freeze == ["vision_model", "language_model"] and stage1.optimization.warmup_ratio == 0.03
    stage2 = load_recipe("report_stage2")
    assert (stage2.lora.r, stage2.lora.alpha, stage2.lora.dropout) == (128, 256, 0.05)
    assert set(stage2.lora.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert {g.name: g.lr for g in stage2.param_groups} == {"lora": 2e-5, "projector": 2e-6}


def _write_variant(tmp_path: Path, name: str, edit) -> Path:
    data = yaml.safe_load(recipe_path(name).read_text())
    edit(data)
    path = tmp_path / f"broken_{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _set(data, dotted, value):
    *parents, last = dotted.split(".")
    for key in parents:
        data = data[key]
    data[last] = value


@pytest.mark.parametrize(
    "dotted, value, key, message",
    [
        ("learning_rate", 1e-4, "learning_rate", "unknown key; allowed keys of <top level>: .*'optimization'"),
        ("optimization.lrr", 1e-4, "optimization.lrr", "unknown key; allowed keys of optimization: .*'lr'"),
        ("model.config_x", {}, "model.config_x", "unknown key"),
        ("optimization.batch_size", "two", "optimization.batch_size", "expected int, got str 'two'"),
        ("optimization.lr", "1e-4", "optimization.lr", r"expected float, got str '1e-4' \(YAML 1.1 reads"),
        ("optimization.scheduler", "cosine_annealing", "optimization.scheduler", "expected one of .*'plateau'"),
        ("freeze", "vision_model", "freeze", "expected a list"),
        ("param_groups", [{"name": "v", "modules": ["vision_model"]}], r"param_groups\[0\].lr", "missing required"),
        ("tiny.optimization.lrr", 1.0, "tiny.optimization.lrr", "unknown key"),
    ],
)
def test_invalid_recipe_names_the_file_and_key(tmp_path, dotted, value, key, message):
    path = _write_variant(tmp_path, "vision_pretrain", lambda data: _set(data, dotted, value))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: {key}: {message}"):
        load_recipe(path, tiny=dotted.startswith("tiny."))


def test_missing_required_key_is_named(tmp_path):
    path = _write_variant(tmp_path, "localization", lambda data: data["optimization"].pop("lr"))
    with pytest.raises(
        ValueError, match=rf"{re.escape(path.name)}: optimization.lr: missing required key\(s\) \['lr'\]"
    ):
        load_recipe(path)


def test_cross_field_rules(tmp_path):
    path = _write_variant(tmp_path, "localization", lambda data: data["optimization"].update(eval_strategy="no"))
    with pytest.raises(ValueError, match="optimization.eval_strategy: the plateau schedule steps on evaluations"):
        load_recipe(path)
    path = _write_variant(tmp_path, "classification", lambda data: data["optimization"].pop("max_steps"))
    with pytest.raises(ValueError, match="optimization.epochs: give `epochs` or `max_steps`"):
        load_recipe(path)
    with pytest.raises(FileNotFoundError, match="unknown recipe 'vision_pretrian'"):
        load_recipe("vision_pretrian")


@pytest.mark.parametrize(
    "recipe, modes, message",
    [
        ("localization", ["text", "box"], r"data.prompt_modes\[1\]: expected one of .*'text\+box'"),
        ("localization", [], r"data.prompt_modes: expected at least one mode"),
        ("classification", ["text"], r"data.prompt_modes: only the localization task has prompt modes"),
    ],
)
def test_prompt_modes_are_checked(tmp_path, recipe, modes, message):
    path = _write_variant(tmp_path, recipe, lambda data: data["data"].update(prompt_modes=modes))
    with pytest.raises(ValueError, match=message):
        load_recipe(path)
    good = _write_variant(tmp_path, "localization", lambda data: data["data"].update(prompt_modes=["text", "text"]))
    assert load_recipe(good).data.prompt_modes == ["text", "text"]


# ----------------------------------------------------------------------------------------------------------------
# ReCTTrainer on a tiny ReCTModel
# ----------------------------------------------------------------------------------------------------------------


class RandomPairs(torch.utils.data.Dataset):
    """Rows of `make_batch`: random volumes, anatomy masks with regions 1..4, token ids and region mentions."""

    def __init__(self, size: int = 12):
        self.batch = make_batch(size, seed=1)
        g = torch.Generator().manual_seed(2)
        regions = load_recipe("vision_pretrain", tiny=True).model.config["vision_config"]["num_regions"]
        self.batch["region_mentions"] = (torch.rand(size, regions, generator=g) > 0.5).float()

    def __len__(self):
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def collate(examples):
    batch = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    return {**batch, "return_loss": True}


def tiny_model() -> ReCTModel:
    torch.manual_seed(0)
    return ReCTModel(ReCTConfig(**load_recipe("vision_pretrain", tiny=True).model.config))


def make_trainer(tmp_path, model, max_steps=3, **trainer_kwargs) -> ReCTTrainer:
    recipe = load_recipe("vision_pretrain", tiny=True)
    args = recipe.training_arguments(
        tmp_path,
        use_cpu=True,
        max_steps=max_steps,
        warmup_steps=0,  # a step-1 warm-up would train at lr 0
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    kwargs = {**recipe.trainer_kwargs(), **trainer_kwargs}
    return ReCTTrainer(model=model, args=args, train_dataset=RandomPairs(), data_collator=collate, **kwargs)


GROUPS = [
    {"name": "vision", "modules": ["vision_model"], "lr": 1e-3, "weight_decay": 0.1},
    {"name": "text", "modules": ["text_model"], "lr": 2e-4},
    {"name": "heads", "modules": ["contrastive_head.*"], "lr": 5e-3, "weight_decay": 0.0},
]


def test_each_parameter_lands_in_exactly_one_group_with_its_lr(tmp_path):
    model = tiny_model()
    trainer = make_trainer(tmp_path, model, param_groups=GROUPS)
    optimizer = trainer.create_optimizer()
    args = trainer.args
    owner = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            assert id(param) not in owner, "a parameter is in two optimizer groups"
            owner[id(param)] = group
    names = dict(model.named_parameters())
    assert set(owner) == {id(p) for p in names.values() if p.requires_grad}
    for name, param in names.items():
        group = owner[id(param)]
        top = name.split(".")[0]
        expected = {
            "vision_model": ("vision", 1e-3),
            "text_model": ("text", 2e-4),
            "contrastive_head": ("heads", 5e-3),
        }
        base, lr = expected.get(top, ("default", args.learning_rate))
        no_decay = name.endswith("bias") or "norm" in name.lower()
        assert group["name"] == (f"{base}/no_decay" if no_decay else base), name
        assert group["lr"] == lr, name
        if no_decay:
            assert group["weight_decay"] == 0.0, name
        else:
            wd = {"vision": 0.1, "text": args.weight_decay, "heads": 0.0, "default": args.weight_decay}[base]
            assert group["weight_decay"] == wd, name
    assert type(optimizer).__name__ == "AdamW"  # the Trainer's optimizer selection (args.optim) is kept


def test_recipe_groups_build_on_the_tiny_model(tmp_path):
    trainer = make_trainer(tmp_path, tiny_model())
    names = {g["name"] for g in trainer.create_optimizer().param_groups}
    assert {"vision", "vision/no_decay", "text", "projector", "heads/no_decay"} <= names
    assert "default" not in names  # the recipe's groups cover the whole model


def test_unmatched_group_or_freeze_pattern_is_named(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"param_groups: 'vison_model' matches no parameter.*'text_model'"):
        make_trainer(tmp_path, model, param_groups=[{"modules": ["vison_model"], "lr": 1e-3}])
    with pytest.raises(ValueError, match=r"freeze: 'language_model' matches no parameter of ReCTModel; top-level"):
        make_trainer(tmp_path, model, freeze=["language_model"])
    with pytest.raises(ValueError, match=r"param_groups\[0\]: missing \['lr'\]"):
        make_trainer(tmp_path, model, param_groups=[{"modules": ["vision_model"]}])


def test_frozen_parameters_stay_out_of_the_optimizer_and_unchanged(tmp_path):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(tmp_path, model, max_steps=1, freeze=["text_model", "projection.*"])
    trainer.train()
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        frozen = name.startswith(("text_model.", "projection."))
        assert param.requires_grad is not frozen, name
        assert (id(param) in in_optimizer) is not frozen, name
        if frozen:
            torch.testing.assert_close(param, before[name], rtol=0, atol=0)
    name = "vision_model.embeddings.projection.weight"
    assert not torch.equal(model.get_parameter(name), before[name])
    assert not torch.equal(model.text_projection.weight, before["text_projection.weight"])  # prefix, not substring


def test_three_step_run_logs_each_loss_term(tmp_path):
    model = tiny_model()
    trainer = make_trainer(tmp_path, model, max_steps=3)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logs] == [1, 2, 3]
    for entry in logs:
        assert {"contrastive_loss", "region_loss", "grad_norm", "learning_rate"} <= set(entry)
        assert math.isfinite(entry["contrastive_loss"]) and math.isfinite(entry["region_loss"])
        # The logged terms are the model's own: total = contrastive + region_alignment_weight × region.
        total = entry["contrastive_loss"] + model.config.region_alignment_weight * entry["region_loss"]
        assert entry["loss"] == pytest.approx(total, abs=2e-4)


def test_step_scheduler_decays_every_step_size(tmp_path):
    model = tiny_model()
    trainer = make_trainer(tmp_path, model, param_groups=[], lr_step={"step_size": 2, "gamma": 0.5})
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    lrs = []
    for _ in range(5):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    base = trainer.args.learning_rate
    assert lrs == pytest.approx([base, base, base / 2, base / 2, base / 4])


def test_lora_parameters_match_by_pattern_on_a_peft_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = load_recipe("report_stage2", tiny=True).lora
    # The vision tower's attention has the LLM's projection names (q/k/v/o_proj): the recipe's targets apply.
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=["text_projection"],
    )
    model = get_peft_model(tiny_model(), config)
    groups = [
        {"name": "lora", "modules": ["*lora_*"], "lr": 1e-3, "weight_decay": 0.0},
        {"name": "projector", "modules": ["text_projection"], "lr": 1e-4, "weight_decay": 0.0},
    ]
    trainer = make_trainer(tmp_path, model, param_groups=groups, freeze=["vision_model.embeddings"])
    optimizer = trainer.create_optimizer()
    by_group = {g["name"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    named = dict(model.named_parameters())
    lora_ids = {id(p) for n, p in named.items() if "lora_" in n}
    projector_ids = {id(p) for n, p in named.items() if "text_projection.modules_to_save" in n}
    assert lora_ids and by_group["lora"] == lora_ids
    assert projector_ids and by_group["projector"] == projector_ids
    assert set(by_group) == {"lora", "projector"}  # peft froze everything else
    trainer.train()  # three steps through the peft model
    assert all("contrastive_loss" in e for e in trainer.state.log_history if "loss" in e)


@pytest.mark.parametrize("tiny", [False, True], ids=["full", "tiny"])
@pytest.mark.parametrize("name", ["vision_pretrain", "classification", "multitask"])
def test_recipe_model_config_builds_and_its_groups_match_the_model(name, tiny, tmp_path):
    """The recipes whose model class exists: the config keys are the config class's, and (tiny) every param group
    and freeze entry names modules of the built model."""
    import hf_models
    from trainers.multitask import ReCTMultitaskModel

    recipe = load_recipe(name, tiny=tiny)
    # The multitask recipe trains its ReCTModel inside the composite; its groups name the composite's modules.
    model_class = ReCTMultitaskModel if name == "multitask" else getattr(hf_models, recipe.model.model_class)
    config = ReCTConfig(**recipe.model.config)
    if not tiny:
        return
    torch.manual_seed(0)
    model = model_class(config)
    args = recipe.training_arguments(tmp_path, use_cpu=True, save_strategy="no")
    trainer = ReCTTrainer(model=model, args=args, **recipe.trainer_kwargs())
    groups = trainer.create_optimizer().param_groups
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    assert {g["name"].split("/")[0] for g in groups} == {g.name for g in recipe.param_groups}


def test_import_trainers_is_light_and_exports_lazily():
    """`import trainers` (and reading a recipe) loads no torch; the lazy names resolve on first use."""
    import subprocess
    import sys

    code = (
        "import sys, trainers; from trainers import recipes; recipes.load_recipe('localization', tiny=True)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
        "from trainers import ReCTTrainer, metrics, load_recipe\n"
        "assert ReCTTrainer.__module__ == 'trainers.trainer' and metrics.__name__ == 'trainers.metrics'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
