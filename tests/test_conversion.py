"""Conversion: every raw format → a Hub folder with strict key accounting, upstream layouts built from the real
upstream code (MONAI's ViT, SAM-Med3D through `medim`), unsafe and truncated input, atomic output, fresh-process
loading of the result."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_kwargs, tiny_vision_kwargs
from safetensors.torch import save_file

from conversion import (
    CheckpointReadError,
    ConversionError,
    UnsafeCheckpointError,
    convert,
    verify_manifest,
)
from hf_models import ReCTVisionConfig, ReCTVisionModel
from trainers.cli import main as cli_main
from trainers.fresh_process import run_without_project


def tiny_encoder(seed: int = 0, **overrides) -> ReCTVisionModel:
    torch.manual_seed(seed)
    return ReCTVisionModel(ReCTVisionConfig(**tiny_vision_kwargs(**overrides))).eval()


def config_dict(model) -> dict:
    return {**model.config.to_dict(), "architectures": [type(model).__name__]}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".converting-" in p.name or ".replaced-" in p.name]


# ----------------------------------------------------------------------------------------------------------------
# Raw files
# ----------------------------------------------------------------------------------------------------------------

WRAPPINGS = {
    "plain": lambda sd: sd,
    "model_state_dict": lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {"state": {}}, "epoch": 50},
    "state_dict": lambda sd: {"state_dict": sd, "best_metric": 0.9},
    "module": lambda sd: {"module": sd},
    "model": lambda sd: {"model": sd, "args": {"lr": 1e-4}},
    "ddp": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "nested_ddp_compiled": lambda sd: {"model_state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("wrapping", sorted(WRAPPINGS))
def test_raw_checkpoint_layouts_convert_to_the_same_weights(tmp_path, wrapping):
    model = tiny_encoder()
    src = tmp_path / "best_model.pt"
    torch.save(WRAPPINGS[wrapping](model.state_dict()), src)
    result = convert(src, tmp_path / "out", config=config_dict(model))
    assert_same_weights(result.model, model)
    assert_same_weights(ReCTVisionModel.from_pretrained(tmp_path / "out"), model)
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert len(report["mapped"]) == len(model.state_dict())
    assert report["dropped"] == {} and report["initialized"] == {}
    assert report["source"]["format"] == "raw"


def test_safetensors_source_and_output_layout(tmp_path):
    model = tiny_encoder()
    save_file(model.state_dict(), tmp_path / "encoder.safetensors")
    out = tmp_path / "out"
    convert(tmp_path / "encoder.safetensors", out, config=config_dict(model))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "manifest.json", "conversion_report.json"} <= names
    assert {"configuration_rect.py", "modeling_rect.py", "preprocessor_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["ReCTVisionModel"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_rect.ReCTVisionConfig",
        "AutoModel": "modeling_rect.ReCTVisionModel",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    verify_manifest(out)
    (out / "config.json").write_text((out / "config.json").read_text() + " ")
    with pytest.raises(ConversionError, match="config.json does not match its sha256"):
        verify_manifest(out)


def test_large_model_is_sharded(tmp_path):
    model = tiny_encoder()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    out = tmp_path / "out"
    convert(tmp_path / "m.pt", out, config=config_dict(model), max_shard_size="20KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert_same_weights(ReCTVisionModel.from_pretrained(out), model)
    verify_manifest(out)


def test_classifier_config_targets_the_classifier_class(tmp_path):
    from hf_models import ReCTConfig, ReCTForVolumeClassification

    torch.manual_seed(0)
    model = ReCTForVolumeClassification(
        ReCTConfig(vision_config=tiny_vision_kwargs(num_regions=0), text_config=None, num_labels=3)
    ).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "classifier.pth")
    result = convert(tmp_path / "classifier.pth", tmp_path / "out", config=config_dict(model))
    assert type(result.model).__name__ == "ReCTForVolumeClassification"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_rect.ReCTForVolumeClassification"


# ----------------------------------------------------------------------------------------------------------------
# Strict accounting, unsafe and broken input, atomic output
# ----------------------------------------------------------------------------------------------------------------


def test_unexpected_key_fails_and_writes_nothing(tmp_path):
    model = tiny_encoder()
    state = {**model.state_dict(), "classifier.weight": torch.zeros(3, 32)}
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(ConversionError, match="classifier.weight"):
        convert(tmp_path / "m.pt", tmp_path / "out", config=config_dict(model))
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_missing_key_and_shape_mismatch_fail(tmp_path):
    model = tiny_encoder()
    state = model.state_dict()
    torch.save({k: v for k, v in state.items() if k != "layernorm.bias"}, tmp_path / "missing.pt")
    with pytest.raises(ConversionError, match=r"missing.*layernorm\.bias"):
        convert(tmp_path / "missing.pt", tmp_path / "out", config=config_dict(model))
    wider = config_dict(tiny_encoder(intermediate_size=128))
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(ConversionError, match=r"layers\.0\.mlp\.fc1\.weight.*\(64, 32\).*\(128, 32\)"):
        convert(tmp_path / "m.pt", tmp_path / "out", config=wider)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_pickle_that_runs_code_is_refused_unless_trusted(tmp_path):
    model = tiny_encoder()
    # A training script that pickles its argparse namespace beside the weights: unpickling constructs an object.
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=1e-4)}, tmp_path / "m.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace.*--trust-pickle"):
        convert(tmp_path / "m.pt", tmp_path / "out", config=config_dict(model))
    assert not (tmp_path / "out").exists()
    result = convert(tmp_path / "m.pt", tmp_path / "out", config=config_dict(model), trust_pickle=True)
    assert_same_weights(result.model, model)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_checkpoint_gives_a_clear_error_and_nothing_written(tmp_path, suffix):
    model = tiny_encoder()
    full = tmp_path / f"full{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), full)
    else:
        save_file(model.state_dict(), full)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match=rf"cut\{suffix}.*truncated or corrupt"):
        convert(cut, tmp_path / "out", config=config_dict(model))
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_existing_output_is_kept_on_failure_and_replaced_only_when_asked(tmp_path):
    model = tiny_encoder()
    torch.save(model.state_dict(), tmp_path / "good.pt")
    torch.save({**model.state_dict(), "extra": torch.zeros(1)}, tmp_path / "bad.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("earlier work")
    with pytest.raises(ConversionError, match="not empty.*--overwrite"):
        convert(tmp_path / "good.pt", out, config=config_dict(model))
    with pytest.raises(ConversionError, match="extra"):
        convert(tmp_path / "bad.pt", out, config=config_dict(model), overwrite=True)
    assert (out / "notes.txt").read_text() == "earlier work" and no_leftovers(tmp_path)
    convert(tmp_path / "good.pt", out, config=config_dict(model), overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert no_leftovers(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Lightning, DeepSpeed, PEFT
# ----------------------------------------------------------------------------------------------------------------


def test_lightning_checkpoint(tmp_path):
    model = tiny_encoder()
    # The layout Lightning's `Trainer.save_checkpoint` writes: the LightningModule's state dict (its `self.model`
    # attribute → `model.` prefixes) beside loop and optimizer state.
    ckpt = {
        "epoch": 4,
        "global_step": 100,
        "pytorch-lightning_version": "2.5.0",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "optimizer_states": [{"state": {}, "param_groups": []}],
        "lr_schedulers": [],
        "loops": {},
    }
    torch.save(ckpt, tmp_path / "epoch=4.ckpt")
    result = convert(tmp_path / "epoch=4.ckpt", tmp_path / "out", config=config_dict(model))
    assert_same_weights(result.model, model)
    assert json.loads((tmp_path / "out" / "conversion_report.json").read_text())["source"]["format"] == "lightning"


DEEPSPEED_SCRIPT = """
import os, sys
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
import deepspeed, torch
sys.path.insert(0, sys.argv[3])
from conftest import tiny_vision_kwargs
from hf_models import ReCTVisionConfig, ReCTVisionModel

torch.manual_seed(0)
model = ReCTVisionModel(ReCTVisionConfig(**tiny_vision_kwargs()))
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
          "zero_allow_untested_optimizer": True}
deepspeed.init_distributed(dist_backend="gloo")
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)
loss = engine(torch.randn(1, 1, 8, 32, 32)).last_hidden_state.square().mean()
engine.backward(loss)
engine.step()
engine.save_checkpoint(os.path.join(sys.argv[1], "zero"))
with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
    torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()},
               os.path.join(sys.argv[1], "expected.pt"))
"""


def test_deepspeed_zero3_folder_consolidates(tmp_path):
    """A real ZeRO-3 checkpoint (one CPU process, gloo) after one optimizer step, consolidated by DeepSpeed."""
    import random

    port = str(random.randint(20000, 40000))
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_SCRIPT, str(tmp_path), port, tests_dir],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=str(Path(__file__).parents[1]),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = torch.load(tmp_path / "expected.pt")
    initial = tiny_encoder().state_dict()
    assert any(not torch.equal(expected[k], initial[k]) for k in expected), "the step changed no weight"
    result = convert(tmp_path / "zero", tmp_path / "out", config=config_dict(tiny_encoder()))
    got = result.model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0, msg=key)
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert report["source"]["format"] == "deepspeed"
    assert any("DeepSpeed ZeRO consolidation" in n for n in report["notes"])


def test_peft_adapter_with_non_lora_trainables(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_encoder()
    peft_model = get_peft_model(tiny_encoder(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
        peft_model.base_model.model.layernorm.weight.mul_(1.5)  # a fully trained non-LoRA module (stage 2)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter, safe_serialization=False)
    assert (adapter / "adapter_model.bin").is_file()
    trainables = {
        f"base_model.model.{k}": v.clone()
        for k, v in peft_model.base_model.model.state_dict().items()
        if "layernorm." == k[:10]
    }
    torch.save(trainables, adapter / "non_lora_trainables.bin")

    out = tmp_path / "out"
    convert(adapter, out, config=config_dict(base))
    assert {p.name for p in out.iterdir()} >= {
        "adapter_model.safetensors",
        "adapter_config.json",
        "non_lora_trainables.safetensors",
        "manifest.json",
    }
    verify_manifest(out)
    from safetensors.torch import load_file

    reloaded_base = tiny_encoder()
    reloaded_base.load_state_dict({**reloaded_base.state_dict(), **load_file(out / "non_lora_trainables.safetensors")})
    reloaded = PeftModel.from_pretrained(reloaded_base, out).eval()
    x = torch.randn(1, 1, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).last_hidden_state, peft_model.eval()(x).last_hidden_state)

    bad = tmp_path / "bad_adapter"
    peft_model.save_pretrained(bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["no_such_module"]}))
    with pytest.raises(ConversionError, match="target modules"):
        convert(bad, tmp_path / "bad_out", config=config_dict(base))


# ----------------------------------------------------------------------------------------------------------------
# Upstream layouts: MONAI ViT, SAM-Med3D
# ----------------------------------------------------------------------------------------------------------------

#: MONAI `ViT` constructor arguments of a 2-layer, 48-wide 3D ViT over (16, 32, 32) volumes → grid (4, 2, 2).
TINY_VIT = dict(
    in_channels=1, img_size=[16, 32, 32], patch_size=[4, 16, 16], hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4
)
MONAI_CASES = {
    "segvol_like": dict(proj_type="conv", pos_embed_type="learnable", classification=False, qkv_bias=False),
    "m3d_like": dict(proj_type="perceptron", pos_embed_type="learnable", classification=True, qkv_bias=False),
    "sincos_qkv_bias": dict(proj_type="conv", pos_embed_type="sincos", classification=True, qkv_bias=True),
}


@pytest.mark.parametrize("case", sorted(MONAI_CASES))
def test_monai_vit_converts_to_equal_outputs(tmp_path, case):
    from monai.networks.nets import ViT

    args = {**TINY_VIT, **MONAI_CASES[case]}
    torch.manual_seed(0)
    vit = ViT(**args).eval()
    with torch.no_grad():
        for param in vit.parameters():  # away from MONAI's zero/identity inits, so every key matters
            param.add_(torch.randn_like(param) * 0.02)
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    (tmp_path / "vit_args.json").write_text(json.dumps(args))
    result = convert(
        tmp_path / "vit.pt", tmp_path / "out", format="monai-vit", source_config=tmp_path / "vit_args.json"
    )
    ours = ReCTVisionModel.from_pretrained(tmp_path / "out").eval()
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        tokens, hidden_states = vit(x)
        if args["classification"]:
            tokens = vit.norm(hidden_states[-1])  # ViT returns the head's output; its tokens are norm(last block)
        got = ours(x).last_hidden_state
    assert got.shape == tokens.shape
    assert (got - tokens).abs().max() <= 1e-4
    report = result.report
    assert set(report.mapped) | set(report.dropped) == set(vit.state_dict())
    assert report.initialized == {}
    assert ours.config.use_cls_token == args["classification"] and ours.config.attention_type == "joint"


def test_monai_vit_into_a_divided_encoder_lists_the_new_keys(tmp_path):
    from monai.networks.nets import ViT

    args = dict(TINY_VIT)
    torch.save(ViT(**args).state_dict(), tmp_path / "vit.pt")
    result = convert(
        tmp_path / "vit.pt",
        tmp_path / "out",
        format="monai-vit",
        source_config=args,
        config={"attention_type": "divided", "num_regions": 4},
    )
    initialized = result.report.initialized
    assert any(k.startswith("region_attention.") for k in initialized)
    assert any(".depth_attention." in k for k in initialized) and any(".depth_layernorm." in k for k in initialized)
    with pytest.raises(ConversionError, match="hidden_size"):
        convert(
            tmp_path / "vit.pt", tmp_path / "o2", format="monai-vit", source_config=args, config={"hidden_size": 64}
        )
    with pytest.raises(ConversionError, match="lacks.*mlp_dim"):
        convert(tmp_path / "vit.pt", tmp_path / "o3", format="monai-vit", source_config={"img_size": 32})


def test_sam_med3d_encoder_with_full_key_report(tmp_path):
    import medim

    torch.manual_seed(0)
    sam = medim.create_model(
        "SAM-Med3D",
        encoder_embed_dim=48,
        encoder_depth=4,
        encoder_num_heads=4,
        encoder_global_attn_indexes=[1, 3],
        image_size=64,
        prompt_embed_dim=32,
    )
    source = sam.state_dict()
    torch.save({"model_state_dict": source, "optimizer_state_dict": {"state": {}}, "epoch": 7}, tmp_path / "sam.pth")
    result = convert(tmp_path / "sam.pth", tmp_path / "out", format="sam-med3d")
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    # Every source key is either mapped or dropped with a reason; nothing else.
    assert set(report["mapped"]) | set(report["dropped"]) == set(source)
    assert not set(report["mapped"]) & set(report["dropped"])
    assert all(
        k.startswith(("prompt_encoder.", "mask_decoder.")) or ".rel_pos_" in k or ".neck." in k
        for k in report["dropped"]
    )
    assert set(report["initialized"]) == {"layernorm.weight", "layernorm.bias"}
    assert any("window attention" in note for note in report["notes"])
    ours = result.model.state_dict()
    enc = sam.image_encoder.state_dict()
    torch.testing.assert_close(ours["embeddings.projection.weight"], enc["patch_embed.proj.weight"], atol=0, rtol=0)
    torch.testing.assert_close(ours["embeddings.position_embeddings"], enc["pos_embed"].reshape(1, 64, 48))
    for i in range(4):
        q, k, v = enc[f"blocks.{i}.attn.qkv.weight"].chunk(3)
        for name, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
            torch.testing.assert_close(ours[f"layers.{i}.attention.{name}.weight"], part, atol=0, rtol=0)
        torch.testing.assert_close(ours[f"layers.{i}.mlp.fc2.weight"], enc[f"blocks.{i}.mlp.lin2.weight"])
    config = result.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (48, 4, 4)
    assert config.volume_size == [64, 64, 64] and config.patch_size == [16, 16, 16] and not config.use_cls_token
    out = result.model(torch.randn(1, 1, 64, 64, 64))
    assert out.last_hidden_state.shape == (1, 64, 48) and torch.isfinite(out.pooler_output).all()


# ----------------------------------------------------------------------------------------------------------------
# Command line and fresh-process loading
# ----------------------------------------------------------------------------------------------------------------

FRESH_LOAD = """
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
x = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(x).last_hidden_state, sys.argv[3])
print(type(model).__name__, project_modules())
"""


def test_cli_convert_and_fresh_process_load(tmp_path, capsys):
    from monai.networks.nets import ViT

    args = dict(TINY_VIT)
    torch.manual_seed(0)
    vit = ViT(**args).eval()
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    code = cli_main(
        [
            "convert",
            str(tmp_path / "vit.pt"),
            "--format",
            "monai-vit",
            "--out",
            str(tmp_path / "out"),
            "--source-config",
            json.dumps(args),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "dropped blocks.0.norm_cross_attn.weight" in printed and "conversion_report.json" in printed

    x = torch.randn(1, 1, 16, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    proc = run_without_project(
        FRESH_LOAD,
        tmp_path / "out",
        tmp_path / "x.pt",
        tmp_path / "y.pt",
        cwd=tmp_path,
        env={"HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ReCTVisionModel", "[]"]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), vit(x)[0], atol=1e-4, rtol=0)

    # A user's mistake is one line and exit code 2.
    code = cli_main(
        ["convert", str(tmp_path / "vit.pt"), "--out", str(tmp_path / "o2"), "--config", str(tmp_path / "out")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cls_token" not in err and "patch_embedding" in err
    assert not (tmp_path / "o2").exists()


def test_source_config_and_format_errors(tmp_path):
    model = tiny_encoder()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with pytest.raises(ConversionError, match="--config is required"):
        convert(tmp_path / "m.pt", tmp_path / "out")
    with pytest.raises(ConversionError, match="--format must be one of"):
        convert(tmp_path / "m.pt", tmp_path / "out", format="onnx")
    with pytest.raises(ConversionError, match="no such file"):
        convert(tmp_path / "none.pt", tmp_path / "out", config=config_dict(model))
    with pytest.raises(ConversionError, match="model_type"):
        convert(tmp_path / "m.pt", tmp_path / "out", config={"model_type": "bert"})
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConversionError, match="cannot tell the format"):
        convert(tmp_path / "folder", tmp_path / "out", config=config_dict(model))


# ----------------------------------------------------------------------------------------------------------------
# The seed-000 checkpoint tree
# ----------------------------------------------------------------------------------------------------------------


def test_seed_tree_converts_every_component(tmp_path):
    from hf_models import ReCTConfig, ReCTForLesionLocalization, ReCTForVolumeClassification
    from tests.conftest import tiny_text_kwargs

    tree = tmp_path / "checkpoints"
    encoder = tiny_encoder(seed=1)
    torch.manual_seed(2)
    classifier = ReCTForVolumeClassification(
        ReCTConfig(vision_config=tiny_vision_kwargs(), text_config=None, num_labels=3)
    ).eval()
    torch.manual_seed(3)
    localizer = ReCTForLesionLocalization(
        ReCTConfig(
            vision_config=tiny_vision_kwargs(),
            text_config=tiny_text_kwargs(),
            localizer_config=dict(
                hidden_size=32, num_attention_heads=4, intermediate_size=64, decoder_channels=[16, 8]
            ),
        )
    ).eval()
    for name, model in (("vision_encoder", encoder), ("classification", classifier), ("localization", localizer)):
        (tree / name).mkdir(parents=True)
        (tree / name / "config.json").write_text(json.dumps(config_dict(model)))
    torch.save({"model_state_dict": encoder.state_dict(), "epoch": 50}, tree / "vision_encoder" / "model_epoch_50.pt")
    torch.save({"model_state_dict": tiny_encoder(seed=9).state_dict()}, tree / "vision_encoder" / "model_epoch_8.pt")
    # The classification head saved alone: its encoder comes from vision_encoder/.
    head = {k: v for k, v in classifier.state_dict().items() if not k.startswith("vision_model.")}
    torch.save({"state_dict": head}, tree / "classification" / "best_model.pt")
    torch.save({"vision_proj": torch.zeros(2, 2)}, tree / "classification" / "biobert_projectors.pt")
    # The localizer as its three part files (its encoder: vision_encoder/).
    from conversion.tree import LOCALIZER_PARTS

    state = localizer.state_dict()
    for file, modules in LOCALIZER_PARTS.items():
        torch.save({k: v for k, v in state.items() if k.split(".")[0] in modules}, tree / "localization" / file)
    (tree / "full_model").mkdir()

    result = convert(tree, tmp_path / "out")
    assert sorted(result.components) == ["classification", "localization", "vision_encoder"]
    assert set(result.skipped) == {"full_model/", "classification/biobert_projectors.pt"}
    out = tmp_path / "out"
    assert_same_weights(ReCTVisionModel.from_pretrained(out / "vision_encoder"), encoder)
    got = ReCTForVolumeClassification.from_pretrained(out / "classification").state_dict()
    for key, value in classifier.state_dict().items():
        expected = encoder.state_dict()[key[len("vision_model.") :]] if key.startswith("vision_model.") else value
        assert torch.equal(got[key], expected), key
    got = ReCTForLesionLocalization.from_pretrained(out / "localization").state_dict()
    for key, value in state.items():
        expected = encoder.state_dict()[key[len("vision_model.") :]] if key.startswith("vision_model.") else value
        assert torch.equal(got[key], expected), key
    report = json.loads((out / "localization" / "conversion_report.json").read_text())
    assert any("taken from vision_encoder/model_epoch_50.pt" in n for n in report["notes"])
    # The localizer's encoder has no region queries: the shared encoder's are dropped by name, with the reason.
    assert report["dropped"] and all(k.startswith("vision_model.region_attention.") for k in report["dropped"])
    assert sorted(report["source"]["files"]) == sorted(f"localization/{f}" for f in LOCALIZER_PARTS)
    for name in result.components:
        verify_manifest(out / name)
    tree_summary = json.loads((out / "conversion_tree.json").read_text())
    assert tree_summary["components"] == ["classification", "localization", "vision_encoder"]

    # A key in the wrong part file fails the whole tree and writes nothing.
    torch.save(
        {**torch.load(tree / "localization" / "attention_unet.pt"), "text_model.extra": torch.zeros(1)},
        tree / "localization" / "attention_unet.pt",
    )
    with pytest.raises(ConversionError, match=r"attention_unet\.pt: keys \['text_model\.extra'\]"):
        convert(tree, tmp_path / "out2")
    assert not (tmp_path / "out2").exists() and no_leftovers(tmp_path)
    (tree / "classification" / "config.json").unlink()
    with pytest.raises(ConversionError, match="classification: no target config"):
        convert(tree, tmp_path / "out3", format="rect-tree")


# ----------------------------------------------------------------------------------------------------------------
# LLaVA-style report-generator checkpoints
# ----------------------------------------------------------------------------------------------------------------


def test_llava_projector_and_lora_adapter(tmp_path):
    """transformers' own LlavaForConditionalGeneration + a real PEFT LoRA → ReCT projector and adapter files."""
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from hf_models import ReCTForConditionalGeneration, ReCTVLMConfig
    from trainers.report_generation import load_projector, load_stage2

    text = {k: v for k, v in tiny_llama_kwargs().items() if k != "model_type"}
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=16
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=LlamaConfig(**text), image_token_index=199)
    ).eval()
    base_state = {k: v.clone() for k, v in llava.state_dict().items()}  # get_peft_model wraps llava's layers in place
    src = tmp_path / "llava_stage2"
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    )
    peft_llava = get_peft_model(llava, lora)
    with torch.no_grad():
        for name, param in peft_llava.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    peft_llava.save_pretrained(src, safe_serialization=False)
    projector = {
        f"base_model.model.{k}": v
        for k, v in peft_llava.base_model.model.state_dict().items()
        if "multi_modal_projector" in k
    }
    torch.save(projector, src / "non_lora_trainables.bin")
    torch.save({k.removeprefix("base_model.model."): v for k, v in projector.items()}, src / "mm_projector.bin")

    config = ReCTVLMConfig(
        vision_config=tiny_vision_kwargs(),
        text_config={"model_type": "llama", **text},
        image_token_id=199,
        image_seq_length=4,
        projector_type="mlp",
    )
    result = convert(src, tmp_path / "out", format="llava", config=config.to_dict())
    out = tmp_path / "out"
    assert {
        "mm_projector.safetensors",
        "adapter_model.safetensors",
        "adapter_config.json",
        "non_lora_trainables.safetensors",
        "manifest.json",
    } <= {p.name for p in out.iterdir()}
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["dropped"] == {} and len(report["mapped"]) == 4 + 4 + 2 * 7 * 2

    # A ReCT report generator with the same language model (weights from the LLaVA base), then the converted files.
    torch.manual_seed(1)
    ours = ReCTForConditionalGeneration(config).eval()
    lm_state = {
        ("lm_head." + k[len("lm_head.") :])
        if k.startswith("lm_head.")
        else "model." + k[len("model.language_model.") :]: v
        for k, v in base_state.items()
        if k.startswith(("model.language_model.", "lm_head."))
    }
    ours.language_model.load_state_dict(lm_state, strict=True)
    load_projector(ours, out)
    for i in (1, 2):
        torch.testing.assert_close(
            getattr(ours.multi_modal_projector, f"linear_{i}").weight,
            base_state[f"model.multi_modal_projector.linear_{i}.weight"],
            atol=0,
            rtol=0,
        )
    adapted = load_stage2(ours, out).eval()
    ids = torch.randint(0, 190, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, peft_llava(input_ids=ids).logits, atol=1e-5, rtol=0)
    # The narrowed target_modules never reach the ReCT vision encoder's own q/k/v projections.
    assert not any("lora_" in n for n, _ in adapted.named_parameters() if ".vision_model." in n)

    (src / "mm_tac_projector.bin").write_bytes(b"")
    with pytest.raises(ConversionError, match="Libra's TAC projector"):
        convert(src, tmp_path / "out2", format="llava", config=config.to_dict())
    with pytest.raises(ConversionError, match="projector_type 'tac'"):
        convert(src, tmp_path / "out3", format="llava", config={**config.to_dict(), "projector_type": "tac"})
    assert result.report.mapped


def test_original_llava_stage1_projector(tmp_path):
    """The original LLaVA code keeps `mm_projector = nn.Sequential(Linear, GELU, Linear)` on its `model`
    (`mlp2x_gelu`) and saves it as `mm_projector.bin`; built here the same way."""
    from hf_models import ReCTVLMConfig

    text = tiny_llama_kwargs(num_hidden_layers=1)
    llava = torch.nn.Module()
    llava.model = torch.nn.Module()
    llava.model.mm_projector = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    (tmp_path / "stage1").mkdir()
    torch.save(llava.state_dict(), tmp_path / "stage1" / "mm_projector.bin")
    config = ReCTVLMConfig(
        vision_config=tiny_vision_kwargs(),
        text_config=text,
        image_token_id=199,
        image_seq_length=4,
        projector_type="mlp",
    )
    result = convert(tmp_path / "stage1", tmp_path / "out", format="llava", config=config.to_dict())
    assert sorted(result.report.mapped.values()) == [
        "multi_modal_projector.linear_1.bias",
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.bias",
        "multi_modal_projector.linear_2.weight",
    ]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "mm_projector.safetensors")
    assert torch.equal(saved["multi_modal_projector.linear_2.weight"], llava.model.mm_projector[2].weight)
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({**llava.state_dict(), "model.mm_projector.4.weight": torch.zeros(2)}, bad / "mm_projector.bin")
    with pytest.raises(ConversionError, match=r"model\.mm_projector\.4\.weight"):
        convert(bad, tmp_path / "out2", format="llava", config=config.to_dict())
