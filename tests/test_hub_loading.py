"""save_pretrained → from_pretrained, auto_map, and loading with trust_remote_code in a fresh process in which the
project's own packages cannot be imported (what a Hub user gets)."""

import json
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from hf_models import (
    ReCTConfig,
    ReCTForFeatureExtraction,
    ReCTForVolumeClassification,
    ReCTModel,
    ReCTVisionConfig,
    ReCTVisionModel,
)
from hf_models.image_processing_rect import ReCTImageProcessor
from hf_models.processing_rect import ReCTProcessor
from tests.conftest import tiny_text_kwargs, tiny_vision_kwargs
from trainers.fresh_process import run_without_project


CODE_FILES = {"configuration_rect.py", "modeling_rect.py"}


def build(cls, seed=0):
    vision = tiny_vision_kwargs()
    if cls in (ReCTVisionModel, ReCTForFeatureExtraction):
        config = ReCTVisionConfig(**vision)
    else:
        config = ReCTConfig(vision_config=vision, text_config=tiny_text_kwargs(), projection_dim=16)
    torch.manual_seed(seed)
    return cls(config).eval()


def fixed_inputs():
    g = torch.Generator().manual_seed(7)
    pixel_values = torch.rand(2, 1, 8, 32, 32, generator=g)
    mask = torch.zeros(2, 1, 8, 32, 32, dtype=torch.long)
    mask[:, :, :, :16] = 1
    mask[:, :, :, 16:, :16] = 3
    input_ids = torch.randint(1000, 2000, (2, 6), generator=g)
    return {"pixel_values": pixel_values, "anatomy_mask": mask, "input_ids": input_ids}


def outputs_of(model, inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        if isinstance(model, ReCTModel):
            out = model(
                input_ids=inputs["input_ids"],
                pixel_values=inputs["pixel_values"],
                anatomy_mask=inputs["anatomy_mask"],
                return_loss=False,
            )
            return {"logits_per_image": out.logits_per_image, "region_embeds": out.region_embeds}
        if isinstance(model, ReCTForVolumeClassification):
            return {"logits": model(inputs["pixel_values"]).logits}
        if isinstance(model, ReCTForFeatureExtraction):
            out = model(inputs["pixel_values"], inputs["anatomy_mask"])
            return {"image_embeds": out.image_embeds, "region_embeds": out.region_embeds}
        out = model(inputs["pixel_values"], inputs["anatomy_mask"])
        return {"last_hidden_state": out.last_hidden_state, "region_features": out.region_features}


MODEL_CLASSES = [ReCTVisionModel, ReCTForFeatureExtraction, ReCTModel, ReCTForVolumeClassification]
EXPECTED_AUTO = {
    ReCTVisionModel: {
        "AutoConfig": "configuration_rect.ReCTVisionConfig",
        "AutoModel": "modeling_rect.ReCTVisionModel",
    },
    ReCTForFeatureExtraction: {
        "AutoConfig": "configuration_rect.ReCTVisionConfig",
        "AutoModel": "modeling_rect.ReCTForFeatureExtraction",
    },
    ReCTModel: {"AutoConfig": "configuration_rect.ReCTConfig", "AutoModel": "modeling_rect.ReCTModel"},
    ReCTForVolumeClassification: {
        "AutoConfig": "configuration_rect.ReCTConfig",
        "AutoModel": "modeling_rect.ReCTForVolumeClassification",
        "AutoModelForImageClassification": "modeling_rect.ReCTForVolumeClassification",
    },
}


@pytest.mark.parametrize("cls", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_save_reload_is_bit_identical_and_auto_map_names_the_saved_class(cls, tmp_path):
    model = build(cls)
    inputs = fixed_inputs()
    expected = outputs_of(model, inputs)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == EXPECTED_AUTO[cls]
    assert config["architectures"] == [cls.__name__]
    assert CODE_FILES <= {p.name for p in tmp_path.glob("*.py")}
    reloaded = cls.from_pretrained(tmp_path).eval()
    for name, value in outputs_of(reloaded, inputs).items():
        assert torch.equal(value, expected[name]), name
    # every tensor came from the file: nothing was left to random initialisation
    for (name, p), (_, q) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(p, q), name


def test_shared_config_does_not_leak_auto_map_between_saved_classes(tmp_path):
    encoder = build(ReCTVisionModel)
    extractor = ReCTForFeatureExtraction(encoder.config)  # same config object on purpose
    extractor.save_pretrained(tmp_path / "extractor")
    encoder.save_pretrained(tmp_path / "encoder")
    extractor.save_pretrained(tmp_path / "extractor_again")
    read = lambda name: json.loads((tmp_path / name / "config.json").read_text())["auto_map"]  # noqa: E731
    assert read("encoder")["AutoModel"] == "modeling_rect.ReCTVisionModel"
    assert read("extractor")["AutoModel"] == "modeling_rect.ReCTForFeatureExtraction"
    assert read("extractor_again")["AutoModel"] == "modeling_rect.ReCTForFeatureExtraction"


def write_volume(path: Path) -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(-1000, 400, size=(40, 36, 12)).astype(np.int16)
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(data, affine), path)


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification,
                              AutoProcessor)

    root = Path(sys.argv[1])
    inputs = torch.load(root / "inputs.pt")
    results, classes = {}, {}
    for name in ("vision", "extractor", "dual", "classifier"):
        folder = root / name
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        classes[name] = [type(config).__name__, type(model).__name__]
        with torch.no_grad():
            if name == "dual":
                out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                            anatomy_mask=inputs["anatomy_mask"], return_loss=False)
                results[name] = out.logits_per_image
            elif name == "classifier":
                results[name] = model(inputs["pixel_values"]).logits
                clf = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
                classes["classifier_auto_clf"] = [type(clf).__name__]
                results["classifier_auto_clf"] = clf(inputs["pixel_values"]).logits
            elif name == "extractor":
                results[name] = model(inputs["pixel_values"], inputs["anatomy_mask"]).image_embeds
            else:
                results[name] = model(inputs["pixel_values"], inputs["anatomy_mask"]).last_hidden_state
    processor = AutoProcessor.from_pretrained(root / "classifier", trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(root / "classifier", trust_remote_code=True)
    classes["processor"] = [type(processor).__name__, type(processor.image_processor).__name__,
                            type(image_processor).__name__]
    batch = processor(images=[str(root / "ct.nii.gz")], text=["No pleural effusion."], return_tensors="pt")
    results["processed_pixel_values"] = batch["pixel_values"]
    results["processed_input_ids"] = batch["input_ids"]
    image_out = image_processor(str(root / "ct.nii.gz"), return_tensors="pt")
    results["image_processor_pixel_values"] = image_out["pixel_values"]
    modules = project_modules()
    torch.save(results, root / "results.pt")
    (root / "classes.json").write_text(json.dumps({"classes": classes, "project_modules": modules}))
    """
)


def test_fresh_process_loads_every_folder_with_trust_remote_code(tmp_path, minilm_dir):
    inputs = fixed_inputs()
    torch.save(inputs, tmp_path / "inputs.pt")
    expected = {}
    for name, cls in (
        ("vision", ReCTVisionModel),
        ("extractor", ReCTForFeatureExtraction),
        ("dual", ReCTModel),
        ("classifier", ReCTForVolumeClassification),
    ):
        model = build(cls)
        model.save_pretrained(tmp_path / name)
        out = outputs_of(model, inputs)
        expected[name] = next(iter(out.values()))
    expected["classifier_auto_clf"] = expected["classifier"]

    processor = ReCTProcessor(
        image_processor=ReCTImageProcessor(volume_size=[8, 32, 32], windows=["lung", "mediastinum"]),
        tokenizer=AutoTokenizer.from_pretrained(minilm_dir),
    )
    processor.save_pretrained(tmp_path / "classifier")
    write_volume(tmp_path / "ct.nii.gz")
    batch = processor(images=[str(tmp_path / "ct.nii.gz")], text=["No pleural effusion."], return_tensors="pt")
    expected["processed_pixel_values"] = batch["pixel_values"]
    expected["processed_input_ids"] = batch["input_ids"]
    expected["image_processor_pixel_values"] = batch["pixel_values"]
    assert {p.name for p in (tmp_path / "classifier").glob("*.py")} >= CODE_FILES | {
        "processing_rect.py",
        "image_processing_rect.py",
    }

    proc = run_without_project(
        FRESH_PROCESS_SCRIPT, tmp_path, cwd=tmp_path, timeout=300, env={"HF_MODULES_CACHE": str(tmp_path / "modules")}
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "classes.json").read_text())
    assert report["project_modules"] == []
    classes = report["classes"]
    assert classes["vision"] == ["ReCTVisionConfig", "ReCTVisionModel"]
    assert classes["extractor"] == ["ReCTVisionConfig", "ReCTForFeatureExtraction"]
    assert classes["dual"] == ["ReCTConfig", "ReCTModel"]
    assert classes["classifier"] == ["ReCTConfig", "ReCTForVolumeClassification"]
    assert classes["classifier_auto_clf"] == ["ReCTForVolumeClassification"]
    assert classes["processor"] == ["ReCTProcessor", "ReCTImageProcessor", "ReCTImageProcessor"]
    results = torch.load(tmp_path / "results.pt")
    for name, value in expected.items():
        torch.testing.assert_close(results[name], value, atol=0, rtol=0, msg=name)
