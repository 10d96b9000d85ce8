"""`vlmtune export`: a standard peft adapter, or a merged 16-bit model that provably holds the LoRA.

Interop is checked in a subprocess that never imports vlmtune: plain peft and transformers must
load what vlmtune wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from posttrain_fixtures import ANSWER, IMAGE, PROMPT, fake_run, overfit_recipe, train_overfit_run

from test_cli import vlmtune


@pytest.fixture(scope="session")
def overfit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished QLoRA run on tiny:qwen2_vl that answers PROMPT about IMAGE with ANSWER (trained once)."""
    return train_overfit_run(tmp_path_factory)


# Max |logit difference| allowed between the merged model and base + unmerged adapter, on the same
# image prompt (logits here are up to ~13 in size). fp32 differs only by summation order; bf16
# rounds every merged weight to 8 mantissa bits.
FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 0.75
LORA_EFFECT = 5.0  # the merged model's logits differ from the base's by at least this much


@pytest.fixture(scope="module")
def exports(overfit_run: Path, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    folders = {"adapter": [], "merged": ["--merge"], "merged32": ["--merge", "--dtype", "float32"]}
    for name, flags in folders.items():
        result = vlmtune("export", str(overfit_run), "--out", str(out / name), *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "exported" in result.stdout
    return {name: out / name for name in folders}


# --- the adapter folder -------------------------------------------------------------------------


@pytest.mark.slow
def test_adapter_export_is_a_standard_peft_folder_with_the_processor(exports, overfit_run: Path):
    folder = exports["adapter"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "processor_config.json", "README.md", "vlmtune_export.json"):  # fmt: skip
        assert (folder / name).is_file(), name
    trained = overfit_run / "3-train/adapter/adapter_model.safetensors"
    assert (folder / "adapter_model.safetensors").read_bytes() == trained.read_bytes()
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    check = json.loads((folder / "vlmtune_export.json").read_text())["checks"][0]
    plan = json.loads((overfit_run / "2-lora/lora_plan.json").read_text())
    assert check["ok"] and check["lora_modules"] == check["targets"] == len(plan["targets"])
    assert check["lora_B_nonzero"] == len(plan["targets"])


@pytest.mark.slow
def test_model_card_says_base_recipe_data_steps_and_final_loss(exports, overfit_run: Path):
    card = (exports["adapter"] / "README.md").read_text()
    final_loss = [
        json.loads(r)["loss"] for r in (overfit_run / "3-train/metrics.jsonl").read_text().splitlines()
    ][-1]
    assert "tiny:qwen2_vl" in card and "4-bit QLoRA, r=16, alpha=16" in card
    assert "| data | 8 training samples (8 images)" in card
    assert "| steps | 60 |" in card
    assert f"| final loss | {final_loss:.4f}" in card
    assert "exact match 50.0% (base 0.0%)" in card, "the eval stage's scores are quoted"
    assert "eval_generate: true" in card, "the resolved recipe is embedded"
    assert "PeftModel.from_pretrained" in card
    merged_card = (exports["merged"] / "README.md").read_text()
    assert "library_name: transformers" in merged_card and "saved in bfloat16" in merged_card


# --- the merged folder ----------------------------------------------------------------------------


@pytest.mark.slow
def test_merged_export_is_16_bit_safetensors_with_the_processor(exports):
    folder = exports["merged"]
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config, "never a 4-bit merge"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    assert not (folder / "adapter_config.json").exists()
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "Qwen2VLProcessor", (
        "AutoProcessor loads it with torchvision"
    )
    video = json.loads((folder / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor", "AutoProcessor needs a video config"
    assert (folder / "chat_template.jinja").is_file()
    checks = json.loads((folder / "vlmtune_export.json").read_text())["checks"]
    assert len(checks) == 4 and all(c["ok"] for c in checks)
    assert {c["module"].split(".")[1] for c in checks} == {"visual", "language_model"}, "both towers probed"
    assert all(c["distance_to_base_plus_lora"] <= 0.1 * c["lora_change_norm"] for c in checks)


INTEROP = """
import json, sys
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.utils import is_torchvision_available

adapter_dir, merged_dir, image_path, prompt = sys.argv[1:5]
if not is_torchvision_available():
    # A machine with torchvision, simulated: the family's video processor stands in under its own name
    # (what AutoProcessor then does with the folder's files is the real code path).
    from transformers import AutoConfig
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor  # the top-level name is a stub
    from transformers.video_processing_utils import VideoProcessorMixin
    from transformers.utils import VIDEO_PROCESSOR_NAME
    name = json.load(open(merged_dir + "/" + VIDEO_PROCESSOR_NAME))["video_processor_type"]
    try:  # without torchvision the real class says so, not "Can't load video processor"
        AutoProcessor.from_pretrained(merged_dir)
        raise AssertionError("AutoProcessor loaded a video processor without torchvision")
    except ImportError as exc:
        assert "Torchvision" in str(exc), exc
    import transformers
    transformers.VideoProcessorMixin = VideoProcessorMixin  # the base class a processor checks its argument against
    stand_in = type(name, (VideoProcessorMixin,), {"__module__": "stand_in"})
    AutoVideoProcessor.register(type(AutoConfig.from_pretrained(merged_dir)), stand_in, exist_ok=True)
base_path = json.load(open(adapter_dir + "/adapter_config.json"))["base_model_name_or_path"]
base = AutoModelForImageTextToText.from_pretrained(base_path, dtype=torch.float32)
with_adapter = PeftModel.from_pretrained(base, adapter_dir).eval()
merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
tokenizer = AutoTokenizer.from_pretrained(merged_dir)
processor = AutoProcessor.from_pretrained(merged_dir)  # the model card's own snippet
ids = tokenizer("What color is the shape?", return_tensors="pt").input_ids
with torch.no_grad():
    a = with_adapter(input_ids=ids).logits
    m = merged(input_ids=ids).logits
assert torch.isfinite(a).all() and torch.isfinite(m).all()
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
inputs = processor(text=[text], images=[[Image.open(image_path).convert("RGB")]], return_tensors="pt")
with torch.no_grad():
    out = merged.generate(**inputs, max_new_tokens=16, do_sample=False)
answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
assert not [name for name in sys.modules if name.split(".")[0] == "vlmtune"], "vlmtune was imported"
print("interop ok", type(processor).__name__, merged.dtype)
print("answer:", answer)
"""


@pytest.mark.slow
def test_plain_transformers_autoprocessor_loads_the_merged_export_and_answers_an_image(
    exports, tmp_path: Path
):
    """The model card's snippet, run without vlmtune: AutoProcessor + a real image + generate."""
    result = subprocess.run(
        [sys.executable, "-c", INTEROP, str(exports["adapter"]), str(exports["merged"]), str(IMAGE), PROMPT],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "interop ok Qwen2VLProcessor torch.bfloat16" in result.stdout
    assert f"answer: {ANSWER}" in result.stdout, (
        "the merged model answers the trained image through AutoProcessor"
    )


@pytest.mark.slow
def test_the_merged_export_is_scored_from_its_own_files_beside_the_adapter(exports, overfit_run: Path):
    report = json.loads((exports["merged"] / "vlmtune_export.json").read_text())
    scored = report["scored"]
    evaluated = json.loads((overfit_run / "4-eval/eval_report.json").read_text())
    assert scored["n"] == 2 and scored["adapter_answers_from"] == "4-eval/eval_report.json"
    assert [p["adapter"] for p in scored["predictions"]] == [p["adapter"] for p in evaluated["predictions"]]
    assert scored["adapter_exact_match"] == evaluated["exact_match"]
    agreeing = sum(p["export"].lower() == p["adapter"].lower() for p in scored["predictions"])
    assert scored["agreeing"] == agreeing and scored["predictions"][0]["export"] == ANSWER
    card = (exports["merged"] / "README.md").read_text()
    assert f"| eval (this folder) | exact match {scored['exact_match']:.1%}" in card
    assert f"the same answer as the adapter on {agreeing} of 2" in card
    adapter = json.loads((exports["adapter"] / "vlmtune_export.json").read_text())
    assert adapter["scored"] is None, "an adapter export is the trained weights themselves"


@pytest.mark.slow
def test_exports_hold_no_absolute_local_path(exports, overfit_run: Path):
    from vlmtune.model.checkpoint import resolve_model_path

    local = [str(overfit_run.parent), str(Path(resolve_model_path("tiny:qwen2_vl")).parent), str(Path.home())]
    for folder in exports.values():
        for name in ("README.md", "vlmtune_export.json"):
            text = (folder / name).read_text()
            assert not [p for p in local if p in text], f"{folder.name}/{name} holds a local path"
    assert "| recipe | `recipe`, run `run` |" in (exports["merged"] / "README.md").read_text()


def test_a_merge_whose_answers_part_from_the_adapter_warns():
    from vlmtune.after.export import export_warnings

    assert export_warnings({"n": 9, "agreeing": 9, "exact_match": 1.0, "adapter_exact_match": 1.0}) == []
    [warning] = export_warnings({"n": 9, "agreeing": 0, "exact_match": 0.0, "adapter_exact_match": 0.5})
    assert "only 0 of 9" in warning and "without --merge" in warning


@pytest.mark.slow
def test_predict_and_eval_take_a_merged_export_folder(exports, tmp_path: Path):
    folder = exports["merged"]
    result = vlmtune(
        "predict", str(folder), "--image", str(IMAGE), "--prompt", PROMPT, "--max-new-tokens", "16"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == ANSWER
    before = sorted(p.name for p in folder.iterdir())
    eval_file = overfit_folder_eval(tmp_path)
    result = vlmtune("eval", str(folder), "--data", str(eval_file))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exact match 50.0%" in result.stdout and "no report file" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == before, "an export folder is never written to"
    refused = vlmtune("eval", str(folder))
    assert refused.returncode == 2 and "--data" in refused.stderr
    refused = vlmtune("predict", str(exports["adapter"]), "--image", str(IMAGE), "--prompt", PROMPT)
    assert refused.returncode == 2 and "adapter export" in refused.stderr and "--merge" in refused.stderr


def overfit_folder_eval(tmp_path: Path) -> Path:
    from posttrain_fixtures import overfit_folder

    return overfit_folder(tmp_path / "data") / "eval.jsonl"


def _logits(model, inputs):
    import torch

    with torch.no_grad():
        return model(**inputs).logits.float()


@pytest.fixture(scope="module")
def image_prompt(exports):
    """A fixed image + prompt + answer, processed by the merged folder's own processor."""
    from vlmtune.after.generate import user_turn
    from vlmtune.data import open_image
    from vlmtune.model.families import get_family
    from vlmtune.model.processing import load_processor

    processor = load_processor(exports["merged"], get_family("qwen2_vl"))
    text = processor.apply_chat_template(user_turn(PROMPT, 1), tokenize=False, add_generation_prompt=True)
    return processor, processor(text=[text + ANSWER], images=[[open_image(str(IMAGE))]], return_tensors="pt")


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "folder", "tolerance"), [("float32", "merged32", FP32_TOLERANCE),
                                                             ("bfloat16", "merged", BF16_TOLERANCE)])  # fmt: skip
def test_merged_logits_equal_base_plus_adapter_and_differ_from_the_base(exports, image_prompt, dtype, folder,
                                                                        tolerance):  # fmt: skip
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    _, inputs = image_prompt
    base_path = json.loads((exports["adapter"] / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    base = AutoModelForImageTextToText.from_pretrained(base_path, dtype=getattr(torch, dtype))
    with_adapter = PeftModel.from_pretrained(base, str(exports["adapter"])).eval()
    adapter_logits = _logits(with_adapter, inputs)
    with with_adapter.disable_adapter():
        base_logits = _logits(with_adapter, inputs)
    merged = AutoModelForImageTextToText.from_pretrained(exports[folder], dtype=getattr(torch, dtype)).eval()
    merged_logits = _logits(merged, inputs)

    assert (merged_logits - adapter_logits).abs().max() <= tolerance
    assert (merged_logits - base_logits).abs().max() >= LORA_EFFECT, (
        "the LoRA is really in the merged weights"
    )


@pytest.mark.slow
def test_the_merged_model_gives_the_trained_answer(exports, image_prompt):
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmtune.after.generate import generate_answer, user_turn
    from vlmtune.data import open_image

    processor, _ = image_prompt
    merged = AutoModelForImageTextToText.from_pretrained(exports["merged"], dtype=torch.bfloat16).eval()
    answer = generate_answer(merged, processor, user_turn(PROMPT, 1), [open_image(str(IMAGE))], 16)
    assert answer == ANSWER


# --- full fine-tuning ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_finetune_exports_as_a_standalone_model(tmp_path: Path):
    recipe = overfit_recipe(tmp_path, max_steps=2)  # eval_generate on: the base is a second model
    run = tmp_path / "run"
    result = vlmtune("train", str(recipe), "--run-dir", str(run), "--set", "lora.method=full",
                     "--set", "quantization.bits=null")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((run / "summary.json").read_text())["stages"]["eval"]
    assert evaluated["status"] == "done" and evaluated["n"] == 2 and evaluated["base_exact_match"] == 0.0
    result = vlmtune("export", str(run), "--out", str(tmp_path / "out"), "--merge")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no merge needed" in result.stderr
    out = tmp_path / "out"
    saved = run / "3-train/model/model.safetensors"
    assert (out / "model.safetensors").read_bytes() == saved.read_bytes()
    assert "full fine-tuning" in (out / "README.md").read_text()
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"


# --- never overwrite; never leave half an export ---------------------------------------------------


def test_an_existing_out_folder_is_never_overwritten(tmp_path: Path):
    run = fake_run(tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = vlmtune("export", str(run), "--out", str(out))
    assert result.returncode == 2 and "already exists" in result.stderr and "hint:" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_export_refuses_a_missing_or_unfinished_run(tmp_path: Path):
    result = vlmtune("export", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = vlmtune(
        "export", str(fake_run(tmp_path / "run", status="running")), "--out", str(tmp_path / "out")
    )
    assert (
        result.returncode == 2 and "did not finish training" in result.stderr and "--resume" in result.stderr
    )
    assert not (tmp_path / "out").exists()


def test_a_failed_export_leaves_nothing_behind(tmp_path: Path):
    """The run's adapter folder is empty: the export fails, and no partial folder remains."""
    result = vlmtune("export", str(fake_run(tmp_path / "run")), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "adapter_config.json is missing" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_help_shows_the_merge_option():
    result = vlmtune("export", "--help")
    assert result.returncode == 0 and "--merge" in result.stdout and "--dtype" in result.stdout


# --- the proofs themselves catch a checkpoint without the LoRA -------------------------------------


def test_the_merge_check_catches_a_checkpoint_that_lacks_the_lora(tmp_path: Path):
    import torch
    from safetensors.torch import save_file

    from vlmtune.after.export import ExportError, Probe, check_merged

    torch.manual_seed(0)
    weight, delta = torch.randn(8, 8), 0.1 * torch.randn(8, 8)
    probe = Probe("model.language_model.layers.0.mlp.up_proj", weight, weight + delta)
    other = {"model.layers.1.mlp.up_proj.weight": torch.randn(8, 8), "lm_head.weight": torch.randn(4, 8)}

    good = tmp_path / "good"
    good.mkdir()
    save_file({**other, "model.layers.0.mlp.up_proj.weight": weight + delta}, good / "model.safetensors")
    [check] = check_merged(good, [probe])
    assert check["ok"] and check["saved_as"] == "model.layers.0.mlp.up_proj.weight"

    unmerged = tmp_path / "unmerged"
    unmerged.mkdir()
    save_file({**other, "model.layers.0.mlp.up_proj.weight": weight}, unmerged / "model.safetensors")
    with pytest.raises(ExportError, match="does not hold the LoRA update of model.language_model.layers.0"):
        check_merged(unmerged, [probe])


def test_the_adapter_check_catches_missing_modules_and_untrained_weights(tmp_path: Path):
    import torch
    from safetensors.torch import save_file

    from vlmtune.after.export import ExportError, check_adapter

    def adapter(modules: list[str], b: float) -> Path:
        path = tmp_path / f"{len(modules)}-{b}.safetensors"
        weights = {}
        for m in modules:
            weights[f"base_model.model.{m}.lora_A.weight"] = torch.ones(2, 8)
            weights[f"base_model.model.{m}.lora_B.weight"] = torch.full((8, 2), b)
        save_file(weights, path)
        return path

    targets = ["model.language_model.layers.0.self_attn.q_proj", "model.visual.blocks.0.attn.qkv"]
    assert check_adapter(adapter(targets, 0.5), targets)["ok"]
    with pytest.raises(ExportError, match="lacks 1 of the 2 planned LoRA modules"):
        check_adapter(adapter(targets[:1], 0.5), targets)
    with pytest.raises(ExportError, match="every lora_B of the adapter is zero"):
        check_adapter(adapter(targets, 0.0), targets)
