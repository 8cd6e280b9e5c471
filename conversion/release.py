"""Per-component Hub releases: stage, verify, upload (`rect-vlm release`) and download (`rect-vlm download`).

Staging copies a trained or converted folder into `<stage>/<org>/<repo>/` (safetensors weights, config, code,
processor and tokenizer files; pickled weights are refused, training leftovers left out), renders `README.md` from
`model_cards/template.md` with `huggingface_hub.ModelCard` (metadata: license, tags, datasets, language, metrics,
`library_name`, `pipeline_tag`, `base_model`, and a model-index built from the component's evaluation JSON; no
evaluation JSON, no numbers), and writes `manifest.json`.

Verification loads every staged folder in a fresh interpreter in which this project cannot be imported, with the
component's Auto class and `trust_remote_code=True`, runs it on a sample volume (through the staged processor when
a scan is given) and compares its output with the source folder's model run by this project's classes.

Uploading goes through `huggingface_hub.HfApi` (`create_repo`, `update_repo_settings` for gating, `upload_folder`,
`create_tag`). A dry run (the default) returns and prints the same plan without calling anything.

The evaluation JSON of a component (`eval_results.json` in its folder, or given explicitly):

    {"task": "image-classification",
     "dataset": {"name": "held-out phantom chest CT", "type": "rect-vlm/phantom-chest-ct", "split": "validation"},
     "description": "what was measured, and how",
     "training_data": "what the model was trained on",
     "datasets": ["hub/dataset-ids", "only if trained on them"],
     "metrics": {"auroc_macro": 0.887, ...},
     "baseline": {"name": "untrained", "metrics": {"auroc_macro": 0.51, ...}}}
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hf_models.configuration_rect import lesion_map_stride

from .readers import ConversionError
from .writer import MANIFEST, REPORT, atomic_folder, write_manifest


EVAL_FILE = "eval_results.json"
COMMON_TAGS = ["medical-imaging", "vision-language", "ct-scan", "radiology", "3d", "rect-vlm"]
LICENSE = "apache-2.0"


@dataclass(frozen=True)
class Component:
    key: str
    repo: str
    card: str  # model_cards/<card>.yaml
    # What verification runs: the Auto class and the output compared.
    auto_class: str
    output: str


COMPONENTS = {
    c.key: c
    for c in (
        Component("vision-encoder", "ReCT-VisionEncoder", "vision_encoder", "AutoModel", "last_hidden_state"),
        Component("classifier", "ReCT-Classifier", "classifier", "AutoModelForImageClassification", "logits"),
        Component("localizer", "ReCT-Localizer", "localizer", "AutoModelForMaskGeneration", "pred_masks"),
        Component("vlm-small", "ReCT-VLM-Small", "vlm", "AutoModelForImageTextToText", "logits"),
    )
}

#: Configs-only releases (SPEC §1): the report generator around a 3–8B model (Medium) and Llama-3.1-70B-Instruct
#: in 4-bit (Large). Their weights never exist on a CPU machine; the repos carry the config, the code and a card.
#: The text configs are those of the named public models.
#: What Llama-3.1-8B-Instruct and Llama-3.1-70B-Instruct share: vocabulary, special tokens, long-context RoPE.
LLAMA_3_1 = dict(
    model_type="llama",
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    rms_norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_id=[128001, 128008, 128009],
)
CONFIG_ONLY = {
    "medium": {
        "repo": "ReCT-VLM-Medium",
        "base_model": "meta-llama/Llama-3.1-8B-Instruct",
        "text_config": dict(
            LLAMA_3_1,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
        ),
        "note": "the language model in bf16 (about 16 GB); LoRA fine-tuning under DeepSpeed ZeRO-3",
    },
    "large": {
        "repo": "ReCT-VLM-Large",
        "base_model": "meta-llama/Llama-3.1-70B-Instruct",
        "text_config": dict(
            LLAMA_3_1,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
        ),
        "note": "the language model loaded in 4-bit (bitsandbytes nf4, about 40 GB) with LoRA (QLoRA)",
    },
}

#: Files a Hub folder carries (besides the code files `*.py`).
HUB_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "model.safetensors",
    "model.safetensors.index.json",
    REPORT,
    EVAL_FILE,
)
#: Training leftovers a trainer writes beside the model; never released.
LEFT_OUT = ("training_args.bin", "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "summary.json")
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class StagedRepo:
    component: Component
    repo_id: str
    folder: Path
    source: Path
    left_out: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Staging
# ----------------------------------------------------------------------------------------------------------------


def _hub_file(name: str) -> bool:
    return name in HUB_FILES or name.endswith(".py") or (name.startswith("model-") and name.endswith(".safetensors"))


def read_evaluation(path: Path | None) -> dict[str, Any] | None:
    """The evaluation JSON (module docstring), checked: numbers are finite floats and the dataset is named."""
    if path is None or not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON: {err}") from err
    for key in ("task", "dataset", "metrics"):
        if key not in data:
            raise ConversionError(f"{path}: an evaluation file needs `{key}` (see conversion/release.py)")
    if not {"name", "type"} <= set(data["dataset"]):
        raise ConversionError(f"{path}: `dataset` needs `name` and `type`, got {sorted(data['dataset'])}")
    for where, metrics in (("metrics", data["metrics"]), ("baseline", data.get("baseline", {}).get("metrics", {}))):
        bad = {k: v for k, v in metrics.items() if not isinstance(v, int | float) or v != v or abs(v) == float("inf")}
        if bad:
            raise ConversionError(f"{path}: `{where}` values must be finite numbers; got {bad}")
    return data


def render_card(
    component: Component,
    repo_id: str,
    folder: Path,
    version: str,
    evaluation: dict[str, Any] | None,
    base_model: str | None,
    usage_key: str | None = None,
) -> str:
    """The model card (`README.md`) of a staged folder, rendered from `model_cards/`."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from model_cards import TEMPLATE_DIR

    text = yaml.safe_load((TEMPLATE_DIR / f"{component.card}.yaml").read_text())
    config = json.loads((folder / "config.json").read_text())
    architecture = config.get("architectures", ["?"])[0]
    vision = config.get("vision_config", config)
    text_config = config.get("text_config")
    described = (
        f"`{architecture}`: vision encoder with {vision.get('num_hidden_layers')} layers, hidden size "
        f"{vision.get('hidden_size')}, patch {vision.get('patch_size')} over volumes of {vision.get('volume_size')} "
        f"voxels, `{vision.get('attention_type')}` attention"
    )
    if text_config is not None and component.card == "vlm":
        described += (
            f"; `{config.get('projector_type')}` projector into {config.get('image_seq_length')} tokens; language "
            f"model `{text_config.get('model_type')}` with {text_config.get('num_hidden_layers')} layers, hidden size "
            f"{text_config.get('hidden_size')}"
        )
    if "id2label" in config and component.key == "classifier":
        labels = [config["id2label"][k] for k in sorted(config["id2label"], key=int)]
        described += f"; {len(labels)} findings: {', '.join(labels)}"
        widths = config.get("lesion_map_channels")
        if widths:
            stride = lesion_map_stride(widths, vision.get("stem_channels", []))
            described += (
                f"; a lesion-map decoder over the convolutional stem (widths {widths}) whose per-finding maximum "
                f"joins each logit, and whose map (`lesion_map_logits`, one cell per {stride}×{stride}×{stride} "
                "voxels) shows where each finding is seen"
            )
    eval_rows, eval_results, metric_names = [], [], []
    baseline_name = "baseline"
    if evaluation is not None:
        baseline = evaluation.get("baseline", {})
        baseline_name = baseline.get("name", "baseline")
        dataset = evaluation["dataset"]
        for name, value in evaluation["metrics"].items():
            other = baseline.get("metrics", {}).get(name)
            eval_rows.append(
                {"metric": name, "value": f"{value:.3f}", "baseline": "–" if other is None else f"{other:.3f}"}
            )
            metric_names.append(name)
            eval_results.append(
                EvalResult(
                    task_type=evaluation["task"],
                    dataset_type=dataset["type"],
                    dataset_name=dataset["name"],
                    dataset_split=dataset.get("split"),
                    metric_type=name,
                    metric_value=float(value),
                )
            )
    card_data = ModelCardData(
        language="en",
        license=LICENSE,
        library_name="transformers",
        pipeline_tag=text["pipeline_tag"],
        tags=[*COMMON_TAGS, *text.get("tags", [])],
        datasets=(evaluation or {}).get("datasets") or None,
        base_model=base_model,
        metrics=metric_names or None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
    )
    conversion = None
    if (folder / REPORT).is_file():
        report = json.loads((folder / REPORT).read_text())
        if "source" in report:
            conversion = {
                "source": report["source"]["path"],
                "sha256": report["source"]["sha256"],
                "format": report["source"]["format"],
                "summary": f"{len(report['mapped'])} source keys mapped, {len(report['dropped'])} dropped with "
                f"reasons, {len(report['initialized'])} target keys initialised",
                "notes": report.get("notes", []),
            }
    usage = USAGE[usage_key or component.key].format(repo=repo_id, auto=component.auto_class).strip()
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_DIR / "template.md"),
        model_name=repo_id.split("/")[-1],
        org=repo_id.split("/")[0],
        summary=text["summary"],
        architecture=described,
        version=version,
        license=LICENSE,
        base_model=base_model,
        usage=usage,
        training_data=(evaluation or {}).get("training_data", "Not stated by the releaser."),
        eval_rows=eval_rows,
        eval_description=(evaluation or {}).get("description", ""),
        baseline_name=baseline_name,
        intended_use=text["intended_use"],
        limitations=text.get("limitations", []),
        conversion=conversion,
    )
    return str(card)


USAGE = {
    "vision-encoder": """
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("{repo}", trust_remote_code=True)
model = AutoModel.from_pretrained("{repo}", trust_remote_code=True).eval()
inputs = processor(images="ct.nii.gz", return_tensors="pt")
features = model(inputs["pixel_values"])  # last_hidden_state (1, tokens, hidden), pooler_output (1, hidden)
""",
    "classifier": """
from transformers import AutoImageProcessor, {auto}

processor = AutoImageProcessor.from_pretrained("{repo}", trust_remote_code=True)
model = {auto}.from_pretrained("{repo}", trust_remote_code=True).eval()
inputs = processor(images="ct.nii.gz", return_tensors="pt")
probabilities = model(inputs["pixel_values"]).logits.sigmoid()[0]
print({{model.config.id2label[i]: round(p, 3) for i, p in enumerate(probabilities.tolist())}})
""",
    "vlm-small": """
from transformers import AutoModelForImageTextToText, AutoProcessor

processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained("{repo}", trust_remote_code=True).eval()
conversation = [{{"role": "user", "content": "<image>\nWrite the findings of this chest CT."}}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
inputs = processor(images=["ct.nii.gz"], prior_images=["prior_ct.nii.gz"], text=[prompt], return_tensors="pt")
keys = ("input_ids", "attention_mask", "pixel_values", "prior_pixel_values", "has_prior")
output = model.generate(**{{k: inputs[k] for k in keys}}, max_new_tokens=256)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0])
""",
    "vlm-config": """
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

config = AutoConfig.from_pretrained("{repo}", trust_remote_code=True)  # ReCTVLMConfig: encoder + {auto} layout
with torch.device("meta"):  # the architecture without allocating it; weights come from training
    model = AutoModelForImageTextToText.from_config(config, trust_remote_code=True)
# To train one: ReCTForConditionalGeneration.from_vision_and_language(encoder, the base model loaded (4-bit for
# Large), image_token_id) and the two-stage recipe of trainers/report_generation.py.
""",
    "localizer": """
from transformers import AutoImageProcessor, {auto}

processor = AutoImageProcessor.from_pretrained("{repo}", trust_remote_code=True)
model = {auto}.from_pretrained("{repo}", trust_remote_code=True).eval()
inputs = processor(images="ct.nii.gz", return_tensors="pt")
# a box prompt (z0, y0, x0, z1, y1, x1) in processed voxels; text prompts go through the tokenizer
masks = model(inputs["pixel_values"], input_boxes=boxes).pred_masks
""",
}


def stage_component(
    key: str,
    source: str | os.PathLike,
    stage_root: str | os.PathLike,
    org: str,
    version: str = "v0.1.0",
    evaluation: str | os.PathLike | None = None,
    base_model: str | None = None,
) -> StagedRepo:
    """Copy `source` into `stage_root/org/<repo>/` as a Hub repo with its model card and manifest (atomically)."""
    if key not in COMPONENTS:
        raise ConversionError(f"unknown component {key!r}; one of {sorted(COMPONENTS)}")
    component = COMPONENTS[key]
    source = Path(source)
    if not (source / "config.json").is_file():
        raise ConversionError(f"{key}: {source} is not a saved model folder (no config.json)")
    config = json.loads((source / "config.json").read_text())
    if not config.get("auto_map"):
        raise ConversionError(f"{key}: {source}/config.json has no auto_map; save it with save_pretrained")
    names = sorted(p.name for p in source.iterdir() if p.is_file())
    pickled = [n for n in names if n.endswith(PICKLED) and n not in LEFT_OUT]
    if pickled:
        raise ConversionError(
            f"{key}: {source} holds pickled weights {pickled}; convert them to safetensors first (`rect-vlm convert`)"
        )
    if not any(n == "model.safetensors" or n == "model.safetensors.index.json" for n in names):
        raise ConversionError(f"{key}: {source} has no safetensors weights (model.safetensors or an index)")
    repo_id = f"{org}/{component.repo}"
    evaluation_path = Path(evaluation) if evaluation is not None else source / EVAL_FILE
    if evaluation is not None and not evaluation_path.is_file():
        raise ConversionError(f"{key}: evaluation file {evaluation_path} not found")
    evaluation_data = read_evaluation(evaluation_path)
    out = Path(stage_root) / org / component.repo
    left_out = [n for n in names if not _hub_file(n)]
    with atomic_folder(out, overwrite=True) as tmp:
        for name in names:
            if _hub_file(name) and name not in (EVAL_FILE, MANIFEST):
                shutil.copy2(source / name, tmp / name)
        if evaluation_data is not None:
            (tmp / EVAL_FILE).write_text(json.dumps(evaluation_data, indent=2) + "\n")
        (tmp / "README.md").write_text(render_card(component, repo_id, tmp, version, evaluation_data, base_model))
        write_manifest(tmp, {"path": str(source), "component": key, "version": version})
    return StagedRepo(component, repo_id, out, source, left_out)


def stage_config_only(
    size: str,
    stage_root: str | os.PathLike,
    org: str,
    version: str = "v0.1.0",
    vision_config: dict[str, Any] | None = None,
    image_seq_length: int = 256,
) -> StagedRepo:
    """A configs-only repo (`CONFIG_ONLY[size]`): `config.json` (the ReCT encoder, by default the seed's, and the
    named language model's text config with `<image>` appended to its vocabulary), the code files and a card."""
    from transformers.dynamic_module_utils import custom_object_save

    from hf_models import ReCTForConditionalGeneration, ReCTVisionConfig, ReCTVLMConfig

    if size not in CONFIG_ONLY:
        raise ConversionError(f"unknown configs-only release {size!r}; one of {sorted(CONFIG_ONLY)}")
    spec = CONFIG_ONLY[size]
    text = dict(spec["text_config"])
    image_token_id = text["vocab_size"]
    text["vocab_size"] += 1  # `<image>`, added after the base vocabulary
    config = ReCTVLMConfig(
        vision_config=vision_config or ReCTVisionConfig().to_dict(),
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=image_seq_length,
    )
    reference = f"modeling_vlm_rect.{ReCTForConditionalGeneration.__name__}"
    config.architectures = [ReCTForConditionalGeneration.__name__]
    config.auto_map = {
        "AutoConfig": f"configuration_rect.{ReCTVLMConfig.__name__}",
        "AutoModel": reference,
        "AutoModelForImageTextToText": reference,
    }
    component = Component(f"vlm-{size}", spec["repo"], "vlm", "AutoConfig", "")
    out = Path(stage_root) / org / spec["repo"]
    repo_id = f"{org}/{spec['repo']}"
    with atomic_folder(out, overwrite=True) as tmp:
        config.save_pretrained(tmp)
        custom_object_save(ReCTForConditionalGeneration, tmp)
        card = render_card(component, repo_id, tmp, version, None, spec["base_model"], usage_key="vlm-config")
        note = (
            f"\n\n**Configuration and code only.** No weights are released in this repository: it describes the "
            f"report generator around `{spec['base_model']}` ({spec['note']}). The vocabulary has `<image>` "
            f"appended as id {image_token_id}.\n"
        )
        (tmp / "README.md").write_text(card.replace("\n## Usage", note + "\n## Usage", 1))
        write_manifest(tmp, {"component": component.key, "version": version, "configs_only": True})
    return StagedRepo(component, repo_id, out, out)


CONFIG_CHECK = """
import json, sys
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
with torch.device("meta"):
    model = AutoModelForImageTextToText.from_config(config, trust_remote_code=True)
print(json.dumps({"class": type(model).__name__, "config": type(config).__name__,
                  "parameters": sum(p.numel() for p in model.parameters()), "project_modules": project_modules()}))
"""


def verify_config_only(staged: StagedRepo) -> dict[str, Any]:
    """Load a configs-only repo's config in a fresh process (project not importable) and build its model on the
    meta device; returns the class and the parameter count."""
    from trainers.fresh_process import run_without_project

    with tempfile.TemporaryDirectory() as tmp:
        proc = run_without_project(
            CONFIG_CHECK, staged.folder.resolve(), cwd=tmp, env={"HF_MODULES_CACHE": str(Path(tmp) / "modules")}
        )
    if proc.returncode != 0:
        raise ConversionError(f"{staged.repo_id}: the config does not load in a fresh process:\n{proc.stderr[-2000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if info["project_modules"]:
        raise ConversionError(
            f"{staged.repo_id}: the fresh process imported project modules {info['project_modules']}"
        )
    return {
        "repo_id": staged.repo_id,
        "class": info["class"],
        "parameters": info["parameters"],
        "max_abs_diff": None,
        "scan": None,
    }


# ----------------------------------------------------------------------------------------------------------------
# Verification in a fresh process
# ----------------------------------------------------------------------------------------------------------------

VERIFY_SCRIPT = """
import json, sys
import torch
import transformers

request = json.load(open(sys.argv[1]))
model = getattr(transformers, request["auto_class"]).from_pretrained(request["folder"], trust_remote_code=True).eval()
inputs = torch.load(request["inputs"])
if request.get("scan"):
    processor = transformers.AutoImageProcessor.from_pretrained(request["folder"], trust_remote_code=True)
    inputs["pixel_values"] = processor(images=[request["scan"]], return_tensors="pt")["pixel_values"]
with torch.no_grad():
    output = getattr(model(**inputs), request["output"])
torch.save({"output": output, "pixel_values": inputs["pixel_values"]}, request["result"])
json.dump({"class": type(model).__name__, "module": type(model).__module__, "project_modules": project_modules()},
          open(request["result"] + ".json", "w"))
"""


def _sample_inputs(model, component: Component, seed: int = 0) -> dict[str, Any]:
    import torch

    vision = getattr(model.config, "vision_config", model.config)
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.rand(1, vision.in_channels, *vision.volume_size, generator=generator) * 2 - 1
    inputs = {"pixel_values": pixel_values}
    if component.key == "localizer":
        d, h, w = vision.volume_size
        inputs["input_boxes"] = torch.tensor([[d / 4, h / 4, w / 4, 3 * d / 4, 3 * h / 4, 3 * w / 4]])
    if component.key == "vlm-small":
        vocab = model.get_input_embeddings().num_embeddings
        words = torch.randint(0, vocab, (1, 8), generator=generator)
        words[words == model.config.image_token_id] = 0
        image = torch.full((1, model.config.image_seq_length), model.config.image_token_id)
        inputs["input_ids"] = torch.cat([words[:, :4], image, words[:, 4:]], dim=1)
    return inputs


def verify_staged(staged: StagedRepo, scan: str | os.PathLike | None = None, atol: float = 1e-5) -> dict[str, Any]:
    """Load the staged folder in a fresh process (project not importable, `trust_remote_code=True`), run it on a
    sample volume (`scan` through the staged processor, else a seeded random volume) and compare with the source
    folder's model under this project's classes. Returns the comparison; raises `ConversionError` on a mismatch."""
    import torch

    from trainers.fresh_process import run_without_project

    from .convert import TARGET_CLASSES

    config = json.loads((staged.source / "config.json").read_text())
    model = TARGET_CLASSES[config["architectures"][0]].from_pretrained(staged.source).eval()
    inputs = _sample_inputs(model, staged.component)
    if scan is not None:
        from hf_models import ReCTImageProcessor

        if not (staged.source / "preprocessor_config.json").is_file():
            raise ConversionError(f"{staged.component.key}: {staged.source} has no processor to read the sample scan")
        processor = ReCTImageProcessor.from_pretrained(staged.source)
        inputs["pixel_values"] = processor(images=[str(scan)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = getattr(model(**inputs), staged.component.output)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save({k: v for k, v in inputs.items() if k != "pixel_values" or scan is None}, tmp / "inputs.pt")
        request = {
            "folder": str(staged.folder.resolve()),
            "auto_class": staged.component.auto_class,
            "output": staged.component.output,
            "inputs": str(tmp / "inputs.pt"),
            "scan": None if scan is None else str(Path(scan).resolve()),
            "result": str(tmp / "result.pt"),
        }
        (tmp / "request.json").write_text(json.dumps(request))
        proc = run_without_project(
            VERIFY_SCRIPT, tmp / "request.json", cwd=tmp, env={"HF_MODULES_CACHE": str(tmp / "modules")}
        )
        if proc.returncode != 0:
            raise ConversionError(
                f"{staged.repo_id}: the staged folder does not load and run in a fresh process:\n{proc.stderr[-2000:]}"
            )
        result = torch.load(tmp / "result.pt")
        info = json.loads((tmp / "result.pt.json").read_text())
    if info["project_modules"]:
        raise ConversionError(
            f"{staged.repo_id}: the fresh process imported project modules {info['project_modules']}"
        )
    if not torch.equal(result["pixel_values"], inputs["pixel_values"]):
        raise ConversionError(f"{staged.repo_id}: the staged processor prepares the sample differently")
    diff = (result["output"].float() - expected.float()).abs().max().item()
    if not diff <= atol:
        raise ConversionError(
            f"{staged.repo_id}: {staged.component.output} from the staged folder differs from the source model's by "
            f"{diff:.2e} (tolerance {atol:.0e})"
        )
    return {"repo_id": staged.repo_id, "class": info["class"], "max_abs_diff": diff, "scan": request["scan"]}


# ----------------------------------------------------------------------------------------------------------------
# Upload and download
# ----------------------------------------------------------------------------------------------------------------


def upload_plan(
    staged: list[StagedRepo],
    version: str = "v0.1.0",
    private: bool = True,
    gated: str | None = None,
    revision: str | None = None,
) -> list[dict[str, Any]]:
    """The `HfApi` calls a release makes, in order, with the files each upload sends (path, bytes, sha256)."""
    if gated not in (None, "auto", "manual"):
        raise ConversionError(f"--gated must be 'auto' or 'manual', got {gated!r}")
    plan: list[dict[str, Any]] = []
    for repo in staged:
        manifest = json.loads((repo.folder / MANIFEST).read_text())
        files = [
            {"path": name, "bytes": (repo.folder / name).stat().st_size, "sha256": digest}
            for name, digest in manifest["files"].items()
        ]
        files.append({"path": MANIFEST, "bytes": (repo.folder / MANIFEST).stat().st_size, "sha256": None})
        plan.append({"call": "create_repo", "repo_id": repo.repo_id, "private": private, "exist_ok": True})
        if gated is not None:
            plan.append({"call": "update_repo_settings", "repo_id": repo.repo_id, "gated": gated})
        plan.append(
            {
                "call": "upload_folder",
                "repo_id": repo.repo_id,
                "folder_path": str(repo.folder),
                "revision": revision,
                "commit_message": f"{repo.component.repo} {version}",
                "files": files,
            }
        )
        plan.append({"call": "create_tag", "repo_id": repo.repo_id, "tag": version, "revision": revision})
    return plan


def execute_plan(plan: list[dict[str, Any]], api) -> list[Any]:
    """Run an `upload_plan` against `api` (an `huggingface_hub.HfApi`)."""
    results = []
    for step in plan:
        call = step["call"]
        if call == "create_repo":
            results.append(api.create_repo(step["repo_id"], private=step["private"], exist_ok=True, repo_type="model"))
        elif call == "update_repo_settings":
            results.append(api.update_repo_settings(step["repo_id"], gated=step["gated"], repo_type="model"))
        elif call == "upload_folder":
            results.append(
                api.upload_folder(
                    repo_id=step["repo_id"],
                    folder_path=step["folder_path"],
                    revision=step["revision"],
                    commit_message=step["commit_message"],
                    repo_type="model",
                )
            )
        elif call == "create_tag":
            results.append(
                api.create_tag(step["repo_id"], tag=step["tag"], revision=step["revision"], repo_type="model")
            )
        else:
            raise ConversionError(f"unknown plan step {call!r}")
    return results


def download(name: str, org: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """`snapshot_download` of a component repo by its name (`ReCT-Classifier`) or key (`classifier`); offline
    (`HF_HUB_OFFLINE=1`) it resolves from the local cache."""
    from huggingface_hub import snapshot_download

    repo = COMPONENTS[name].repo if name in COMPONENTS else name
    return Path(snapshot_download(f"{org}/{repo}", revision=revision, cache_dir=cache_dir))


def install_in_cache(
    folder: str | os.PathLike, repo_id: str, cache_dir: str | os.PathLike, revisions=("main",)
) -> Path:
    """Lay a staged folder out as a Hub download in the HF cache (`models--org--name/{blobs,snapshots,refs}`), for
    machines that cannot reach the Hub: `from_pretrained(repo_id)` then works with `HF_HUB_OFFLINE=1`. The
    snapshot's commit id is the sha1 of the folder's manifest. Returns the snapshot folder."""
    folder = Path(folder)
    manifest = (folder / MANIFEST).read_bytes()
    commit = hashlib.sha1(manifest).hexdigest()
    repo_dir = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        blob = repo_dir / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copy2(path, blob)
        target = snapshot / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to(os.path.relpath(blob, target.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    for revision in revisions:
        (repo_dir / "refs" / revision).write_text(commit)
    return snapshot


# ----------------------------------------------------------------------------------------------------------------
# The whole release
# ----------------------------------------------------------------------------------------------------------------


def release(
    components: dict[str, str | os.PathLike],
    stage_root: str | os.PathLike,
    org: str,
    version: str = "v0.1.0",
    evaluations: dict[str, str | os.PathLike] | None = None,
    base_models: dict[str, str] | None = None,
    scan: str | os.PathLike | None = None,
    config_only: tuple[str, ...] | list[str] = (),
    dry_run: bool = True,
    api=None,
    private: bool = True,
    gated: str | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """Stage every component in `components` (key → folder) and the configs-only repos in `config_only`
    (`CONFIG_ONLY` sizes, with the released encoder's config when there is one), verify each in a fresh process,
    then upload (or, by default, only plan the upload). Writes `stage_root/org/release_plan.json`; returns the staged
    repos, the verification results and the plan."""
    if not components and not config_only:
        raise ConversionError(f"nothing to release: give at least one of {sorted(COMPONENTS)} or configs-only sizes")
    evaluations, base_models = evaluations or {}, base_models or {}
    unknown = sorted((set(components) | set(evaluations) | set(base_models)) - set(COMPONENTS))
    if unknown:
        raise ConversionError(f"unknown component(s) {unknown}; one of {sorted(COMPONENTS)}")
    staged = [
        stage_component(key, folder, stage_root, org, version, evaluations.get(key), base_models.get(key))
        for key, folder in components.items()
    ]
    verified = [verify_staged(repo, scan) for repo in staged]
    encoder = components.get("vision-encoder")
    vision = json.loads((Path(encoder) / "config.json").read_text()) if encoder is not None else None
    for size in config_only:
        repo = stage_config_only(size, stage_root, org, version, vision)
        staged.append(repo)
        verified.append(verify_config_only(repo))
    plan = upload_plan(staged, version, private, gated, revision)
    (Path(stage_root) / org / "release_plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    results = None
    if not dry_run:
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        results = execute_plan(plan, api)
    return {"staged": staged, "verified": verified, "plan": plan, "uploaded": not dry_run, "results": results}
