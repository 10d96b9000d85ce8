"""`vlmtune export RUN --format gguf`: the language model and its vision projector (mmproj) as GGUF files.

The run is merged into a 16-bit transformers folder first (after/export.py: the base reloaded
unquantized, the merge proved), then llama.cpp's own converter (convert_hf_to_gguf.py, run as a
separate process through after/gguf_converter.py) writes the language GGUF and, with ``--mmproj``,
the vision tower + projector GGUF that llama.cpp's mtmd and Ollama load beside it; the vision
fine-tune travels in the mmproj. ``q4_k_m`` quantizes the f16 file with llama.cpp's quantizer
(llama-cpp-python). No GGUF byte is written by vlmtune itself.

The converter is the one llama-cpp-python's source distribution vendors; `make install-gguf` builds
llama-cpp-python and puts the converter where ``converter_dir`` finds it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from vlmtune.after.export import ExportError, card_facts, export_merged, model_card
from vlmtune.after.export_staging import curves_lines, staged, write_card_and_report
from vlmtune.after.trained import TrainedRun
from vlmtune.errors import VlmtuneError
from vlmtune.model.families import Family, get_family
from vlmtune.runs import rundir

QUANTS = ("f16", "q8_0", "q4_k_m")
CONVERTER_ENV = "VLMTUNE_LLAMA_CPP"  # a llama.cpp source folder holding convert_hf_to_gguf.py
INSTALLED_CONVERTER = Path("share") / "vlmtune" / "llama.cpp"  # under sys.prefix: `make install-gguf`
INSTALL_HINT = "run `make install-gguf` (it compiles llama.cpp for llama-cpp-python; docs/export.md)"
MMPROJ_TYPE = "f16"  # the projector stays 16-bit whatever --quant says, as llama.cpp's own releases ship it
# BPE pre-tokenizers by llama.cpp's name: the split regex of the tokenizer.json that llama.cpp's
# "qwen2" pre-tokenizer implements. The converter names a tokenizer's pre-tokenizer by hashing what a
# known checkpoint's vocabulary makes of a test string, which a vocabulary of another size (vlmtune's
# tiny models) cannot match; a tokenizer whose split regex is this one is pre-tokenized the same way.
PRE_TOKENIZER_REGEX = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


class GgufUnavailable(VlmtuneError):
    """llama.cpp's converter (or llama-cpp-python) is not installed."""


def check_family(family: Family) -> None:
    """A family llama.cpp cannot convert (or vlmtune has not proven) is refused by name, with the reason."""
    if family.gguf_pre_tokenizer is None:
        raise ExportError(
            f"--format gguf is not available for {family.title}: {family.gguf_refused}",
            hint="export a merged transformers folder (--merge) or a vLLM folder (--format vllm) instead",
        )


def check_config(config: dict, family: Family) -> None:
    """Refuse a model whose config differs from a value llama.cpp assumes for the family (it would convert,
    and answer differently: the value never reaches the GGUF)."""
    for path, assumed in family.gguf_assumed_config:
        value = _config_value(config, path)
        if value != assumed:
            raise ExportError(
                f"--format gguf: this {family.title} model has {path} = {value}, and llama.cpp computes with "
                f"{assumed} whatever the config says, so the GGUF would not answer like the trained model",
                hint=f"export --merge (transformers) or --format vllm; or train from a model with {path} = {assumed}",
            )


def base_config(trained: TrainedRun) -> dict:
    """The trained base model's config (what the merged folder's config.json will hold), read before any
    weight loads."""
    from vlmtune.model.checkpoint import read_config, resolve_model_path

    model = trained.recipe.model
    return read_config(resolve_model_path(model.name), model.revision).to_dict()


def folder_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def _config_value(config: dict, path: str):
    for key in path.split("."):
        config = config.get(key) if isinstance(config, dict) else None
    return config


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise ExportError(
            f"--quant {quant!r} is not one of {', '.join(QUANTS)}", hint="--quant q8_0, for example"
        )


def converter_dir() -> Path:
    """The llama.cpp folder with convert_hf_to_gguf.py: $VLMTUNE_LLAMA_CPP, else the one `make install-gguf` put."""
    folder = Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / INSTALLED_CONVERTER)
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise GgufUnavailable(
            f"llama.cpp's converter is not installed (no {folder}/convert_hf_to_gguf.py)", hint=INSTALL_HINT
        )
    return folder


def file_names(quant: str) -> dict[str, str]:
    return {
        "model": rundir.GGUF_MODEL.format(quant=quant),
        "mmproj": rundir.GGUF_MMPROJ.format(quant=MMPROJ_TYPE),
    }


# --- the export -----------------------------------------------------------------------------------


def export_gguf(trained: TrainedRun, out: Path, quant: str, dtype: str, verify: bool = False) -> dict:
    """Write the GGUF files, the Ollama Modelfile, the card and the report into ``out`` (new)."""
    family = get_family(trained.run.read_json(rundir.MODEL_REPORT)["family"])
    check_family(family)
    check_quant(quant)
    if family.gguf_assumed_config:
        check_config(base_config(trained), family)  # before the merge, which may take minutes
    converter = converter_dir()
    if quant == "q4_k_m" or verify:
        llama_cpp_module()  # before any weight loads: the quantizer and --verify need llama-cpp-python
    if verify:
        from vlmtune.after.gguf_verify import eval_items

        eval_items(trained)  # a run without data.eval fails now, not after the conversion
    names = file_names(quant)
    with staged(out) as staging:
        hf = staging / ".merged"  # the converter's input, removed before the folder is handed over
        checks = export_merged(trained, hf, dtype) if not trained.is_full else _copy_full(trained, hf)
        check_config(folder_config(hf), family)  # what the converter reads
        pre = matching_pre_tokenizer(hf, family)
        name = Path(out).name
        convert(converter, hf, staging / names["model"], quant, mmproj=False, pre_tokenizer=pre, name=name)
        convert(
            converter, hf, staging / names["mmproj"], MMPROJ_TYPE, mmproj=True, pre_tokenizer=pre, name=name
        )
        checks.append(check_gguf_files(staging / names["model"], staging / names["mmproj"]))
        (staging / rundir.OLLAMA_MODELFILE).write_text(modelfile(family, names), encoding="utf-8")
        verified = (
            verify_against(hf, staging / names["model"], staging / names["mmproj"], trained)
            if verify
            else None
        )
        facts = {**card_facts(trained, "gguf", dtype), "dtype": quant, "mmproj_dtype": MMPROJ_TYPE}
        report = {**facts, "gguf": names, "checks": checks, "verify": verified}
        write_card_and_report(
            staging,
            model_card(facts, Path(out).name, serve_lines(names) + curves_lines(trained.run, staging)),
            report,
        )
        shutil.rmtree(hf)
    return report


def _copy_full(trained: TrainedRun, hf: Path) -> list[dict]:
    from vlmtune.after.export import export_full, save_export_processor

    checks = export_full(trained, hf)
    save_export_processor(trained, hf)
    return checks


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        raise GgufUnavailable("llama-cpp-python is not installed", hint=INSTALL_HINT) from None
    return llama_cpp


def matching_pre_tokenizer(folder: Path, family: Family) -> str | None:
    """The family's llama.cpp pre-tokenizer when the tokenizer splits text with its exact regex, else None
    (the converter then names it by its own hash, or refuses it)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    regexes = [
        p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"
    ]
    name = family.gguf_pre_tokenizer
    return name if regexes == [PRE_TOKENIZER_REGEX.get(name)] else None


def convert(
    converter: Path, hf: Path, out: Path, outtype: str, mmproj: bool, pre_tokenizer: str | None, name: str
) -> None:
    """Run llama.cpp's converter in its own process; q4_k_m goes through f16 and llama.cpp's quantizer.
    ``name``: the model's name in the GGUF metadata (general.name)."""
    target = out.with_name(out.name + ".f16") if outtype == "q4_k_m" else out
    command = [sys.executable, "-m", "vlmtune.after.gguf_converter", str(converter), pre_tokenizer or "",
               str(hf), "--outtype", "f16" if outtype == "q4_k_m" else outtype, "--outfile", str(target),
               "--model-name", name]  # fmt: skip
    if mmproj:
        command.append("--mmproj")
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _package_root()}
    )
    if done.returncode != 0 or not target.is_file():
        raise ExportError(
            f"llama.cpp's converter failed on the merged model{' (mmproj)' if mmproj else ''}: "
            + _last_error(done.stderr),
            hint="this llama.cpp cannot convert these shapes; export --merge (transformers) or --format vllm",
        )
    if outtype == "q4_k_m":
        quantize(target, out, "LLAMA_FTYPE_MOSTLY_Q4_K_M")
        target.unlink()


def _package_root() -> str:
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def quantize(source: Path, out: Path, ftype: str) -> None:
    """llama.cpp's quantizer (llama_model_quantize), as `llama-quantize` runs it."""
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise ExportError(f"llama.cpp's quantizer failed on {source.name}", hint="export --quant q8_0 or f16")


def check_gguf_files(model: Path, mmproj: Path) -> dict:
    """Read both files back with the gguf package: the language file has no vision tensor, the mmproj has
    the vision encoder and projector tensors, and both name their architecture."""
    from gguf import GGUFReader

    language, vision = GGUFReader(str(model)), GGUFReader(str(mmproj))
    language_names = [t.name for t in language.tensors]
    vision_names = [t.name for t in vision.tensors]
    arch = _field(language, "general.architecture")
    ok = bool(language_names) and not any(n.startswith("v.") for n in language_names)
    ok = (
        ok
        and any(n.startswith("v.blk.") for n in vision_names)
        and any(n.startswith("mm.") for n in vision_names)
    )
    if not ok:
        raise ExportError(
            f"the GGUF files do not hold what they should ({len(language_names)} language tensors, "
            f"{len(vision_names)} mmproj tensors)",
            hint="report this as a vlmtune bug, with vlmtune_export.json",
        )
    return {
        "check": "language GGUF and mmproj read back (gguf package)",
        "architecture": arch,
        "language_tensors": len(language_names),
        "mmproj_tensors": len(vision_names),
        "projector_type": _field(vision, "clip.projector_type"),
        "ok": True,
    }


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def modelfile(family: Family, names: dict[str, str]) -> str:
    """An Ollama Modelfile: the language GGUF, its projector, the chat template, greedy answers."""
    lines = [f"FROM ./{names['model']}", f"FROM ./{names['mmproj']}"]
    if family.ollama_template:
        lines.append(f'TEMPLATE """{family.ollama_template}"""')
    return "\n".join([*lines, "PARAMETER temperature 0", ""])


def serve_lines(names: dict[str, str]) -> list[str]:
    return [
        "## Serve it",
        "",
        "```sh",
        "# llama.cpp (from inside this folder)",
        f"llama-server -m {names['model']} --mmproj {names['mmproj']}",
        "# Ollama",
        "ollama create my-finetune -f Modelfile && ollama run my-finetune",
        "```",
        "",
        "The vision fine-tune is in the mmproj file: serve the two files together.",
        "",
    ]


def verify_against(hf: Path, model: Path, mmproj: Path, trained: TrainedRun) -> dict | None:
    from vlmtune.after.gguf_verify import verify

    return verify(hf, model, mmproj, trained)
