"""The sections of a recipe every objective reads: model, quantization, lora, data, train (with its
distributed part) and output, each with its defaults and its own checks."""

from __future__ import annotations

import difflib
from types import UnionType
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from vlmtune.choices import (
    NO_QUANTIZATION,
    AttnImplementation,
    DataFormat,
    Device,
    Dtype,
    LoraBias,
    LoraMethod,
    Objective,
    Optimizer,
    QuantBits,
    QuantType,
    Scheduler,
    Strategy,
    Tracker,
)
from vlmtune.paths import TINY_PREFIX


class Strict(BaseModel):
    # allow_inf_nan: no nan/inf in any number of a recipe (a learning rate of .inf validated before).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Section(Strict):
    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's true/false would pass as 1/0 for a number (pydantic's lax mode): refuse them."""
        if isinstance(value, bool) and info.field_name and wants_number(cls.model_fields[info.field_name]):
            raise ValueError(f"expects a number, got {str(value).lower()}")
        return value


def wants_number(field: FieldInfo) -> bool:
    annotation = field.annotation
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return bool(set(options) & {int, float}) and bool not in options


class ModelSection(Section):
    name: str = Field(description="Hub id, local folder, or tiny:FAMILY for a fabricated tiny model.")
    dtype: Dtype = Field(
        "bfloat16",
        description="dtype of everything that is not quantized (vision tower, projector, lm_head).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    attn_implementation: AttnImplementation | None = Field(
        None, description="Attention kernel; None lets transformers choose (sdpa where supported)."
    )
    adapter: str | None = Field(
        None,
        description="A finished run folder of this same base model to train on from: its trained adapter "
        "(or, for lora.method full, its full weights) is loaded, trainable, instead of a fresh one; the lora "
        "section must describe that adapter as its run did (e.g. an SFT run, then DPO from it).",
    )

    @field_validator("name")
    @classmethod
    def _known_tiny_family(cls, value: str) -> str:
        if value.startswith(TINY_PREFIX):
            from vlmtune.model.families import family_names

            family = value[len(TINY_PREFIX) :]
            if family not in family_names():
                close = difflib.get_close_matches(family, family_names(), n=1)
                hint = f" (did you mean tiny:{close[0]}?)" if close else ""
                raise ValueError(
                    f"unknown tiny family {family!r}{hint}; choose one of {', '.join(family_names())}"
                )
        return value


class QuantizationSection(Section):
    bits: QuantBits | None = Field(
        4, description="4 = QLoRA (NF4), 8 = LLM.int8, null = no quantization (16-bit LoRA or full)."
    )
    quant_type: QuantType = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(
        True, description="Quantize the quantization constants too (saves ~0.4 bit/param)."
    )
    keep_16bit: list[str] = Field(
        default_factory=list,
        description="Extra full module prefixes kept out of quantization (the vision tower, projector and "
        "lm_head always are).",
    )

    @field_validator("bits", mode="before")
    @classmethod
    def _none_word(cls, value: Any) -> Any:
        return None if isinstance(value, str | int) and str(value).lower() in NO_QUANTIZATION else value


class LoraSection(Section):
    method: LoraMethod = Field("lora", description="lora trains adapters; full trains every weight.")
    finetune_vision_layers: bool = Field(True, description="LoRA on the vision tower's Linears.")
    finetune_language_layers: bool = Field(True, description="LoRA on the language model's Linears.")
    finetune_attention_modules: bool = Field(True, description="LoRA on attention projections.")
    finetune_mlp_modules: bool = Field(True, description="LoRA on MLP projections.")
    train_projector: bool = Field(
        False, description="Train the vision-to-language projector fully (it is small)."
    )
    r: int = Field(16, gt=0, description="LoRA rank: higher = more capacity and memory.")
    alpha: int = Field(
        16, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r))."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    bias: LoraBias = Field("none", description="Which biases to train.")
    target_modules: str | None = Field(
        None,
        description="Regex over full module names that replaces the toggles (peft full-matches it).",
    )

    @model_validator(mode="after")
    def _something_to_train(self) -> LoraSection:
        if self.method != "lora" or self.target_modules:
            return self
        if not (self.finetune_vision_layers or self.finetune_language_layers):
            raise ValueError(
                "finetune_vision_layers and finetune_language_layers are both false: LoRA would train nothing; "
                "turn one on"
            )
        if not (self.finetune_attention_modules or self.finetune_mlp_modules):
            raise ValueError(
                "finetune_attention_modules and finetune_mlp_modules are both false: LoRA would train nothing; "
                "turn one on"
            )
        return self


class DataSection(Section):
    # The column names format `columns` reads where the recipe maps none.
    DEFAULT_COLUMNS: ClassVar[dict[str, str | None]] = {
        "image": "image",
        "question": "question",
        "answer": "answer",
        "system": None,
    }

    train: str = Field(
        description="Training data: a .jsonl/.json/.parquet/.csv/.arrow file, a folder written by "
        "datasets' save_to_disk, or a hub dataset id (paths relative to the recipe)."
    )
    eval: str | None = Field(None, description="Optional evaluation data, same kinds of source.")
    train_split: str = Field(
        "train", description="Split of a hub dataset or a save_to_disk DatasetDict read for `train`."
    )
    eval_split: str = Field(
        "validation", description="Split of a hub dataset or a save_to_disk DatasetDict read for `eval`."
    )
    subset: str | None = Field(None, description="Configuration (subset) name of a hub dataset.")
    format: DataFormat = Field(
        "auto",
        description="Sample layout. messages: OpenAI/TRL/Axolotl `messages` with content parts; sharegpt: "
        "`conversations`/`messages` with `<image>` placeholders in the text and an `images` list; "
        "prompt_completion: TRL `prompt` + `completion` (loss on the completion); exchanges: a list of "
        "user/assistant pairs (The Cauldron's `texts`); query_response: ms-swift query/response/history "
        "(and aliases, alpaca instruction/input/output); columns: plain columns named by `columns`; auto: "
        "decided per sample from its keys (see docs/data.md).",
    )
    columns: dict[Literal["image", "question", "answer", "system"], str | None] = Field(
        default_factory=lambda: dict(DataSection.DEFAULT_COLUMNS),
        description="For format columns: which column holds the image (one or a list; empty = text-only), "
        "the question, the answer and an optional system prompt. Keys left out keep their default names; "
        "question: null makes `prompt` the user text.",
    )
    prompt: str | None = Field(
        None,
        description="User text for format columns when columns.question is null (captioning sets), "
        "e.g. 'Describe the image.'",
    )
    image_placeholder: str = Field(
        "<image>", min_length=1, description="The marker that stands for one image in sharegpt-style text."
    )
    image_root: str | None = Field(
        None,
        description="Folder relative image paths are resolved in, and must stay inside (default: the data "
        "file's folder).",
    )
    max_samples: int | None = Field(None, gt=0, description="Use only the first N samples (after shuffling).")
    shuffle: bool = Field(True, description="Shuffle the training samples with train.seed.")
    max_image_pixels: int | None = Field(
        602_112,
        gt=0,
        description="Pixel budget per image; larger images are resized down by the family's rules (the data "
        "report counts them).",
    )
    max_image_side: int = Field(
        16_384,
        gt=0,
        description="An image whose width or height exceeds this is refused before it is decoded (guards "
        "against decompression bombs and corrupt headers).",
    )
    train_on_responses_only: bool = Field(True, description="Loss on assistant turns only.")
    too_long: Literal["error", "drop"] = Field(
        "error", description="A sample longer than max_length: stop with its index, or drop it (counted)."
    )
    on_bad_sample: Literal["error", "skip"] = Field(
        "error", description="A sample that fails validation: stop, or skip it (listed in data_report.json)."
    )
    allow_urls: bool = Field(
        False,
        description="Let samples fetch http(s) image URLs (off: such samples are refused with a reason).",
    )
    url_timeout: float = Field(
        30.0, gt=0, description="Seconds to wait for one image URL when allow_urls is on."
    )
    image_check: Literal["fast", "full"] = Field(
        "fast",
        description="How the pre-flight proves each image whole. fast: a JPEG's segments and scans walked to "
        "its end marker, a PNG's chunks read to the end with their checksums, other formats decoded; full: "
        "every pixel decoded (slower; also catches compressed data corrupted inside an intact file).",
    )
    check_workers: int | None = Field(
        None,
        ge=0,
        description="Worker processes the pre-flight checks samples in; 0 = this process only; null = one per "
        "CPU core but one, for sets of 5,000 samples or more on machines of 4 cores or more (on 2 cores "
        "workers cost more than they give).",
    )

    @field_validator("columns", mode="after")
    @classmethod
    def _keep_default_column_names(cls, value: dict) -> dict:
        return {**cls.DEFAULT_COLUMNS, **value}

    @model_validator(mode="after")
    def _one_user_text(self) -> DataSection:
        if self.columns["question"] is not None and self.prompt is not None:
            raise ValueError(
                "data.prompt is set and so is data.columns.question; give one: the prompt replaces a question "
                "column (set columns.question: null)"
            )
        if self.columns["answer"] is None:
            raise ValueError("data.columns.answer cannot be null: the answer is what the model learns")
        return self


class DistributedSection(Section):
    """How ranks share the work when the run is launched by torchrun or accelerate launch.

    A plain `vlmtune train` is one process and ignores this section; docs/distributed.md shows the
    launches and what each strategy costs in memory.
    """

    strategy: Strategy = Field(
        "ddp",
        description="ddp: every rank holds the whole model (its own 4-bit copy) and trains on its share of "
        "the batches; fsdp: parameters, gradients and optimizer states are sharded across ranks (FSDP2), for "
        "models that do not fit one GPU, each vision and decoder block wrapped as one unit.",
    )
    timeout: int = Field(
        1800,
        gt=0,
        description="Seconds a rank waits for the others in one collective before the run fails: a stuck "
        "rank becomes an error instead of a silent hang.",
    )


class TrainSection(Section):
    objective: Objective = Field(
        "sft",
        description="What the train stage optimises: sft = supervised fine-tuning on the answers; dpo = "
        "preference tuning on chosen/rejected pairs (docs/preference.md); grpo = online RL, rewarding sampled "
        "answers (docs/rl.md). An objective with knobs reads them from the recipe section of the same name.",
    )
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; -1 = run `epochs` epochs.")
    epochs: float = Field(1.0, gt=0, description="Epochs when max_steps is -1.")
    batch_size: int = Field(2, gt=0, description="Samples per device per step.")
    grad_accum: int = Field(4, gt=0, description="Gradient accumulation steps.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Scheduler = Field("linear")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optim: Optimizer = Field(
        "adamw_torch", description="Optimizer (the 8-bit ones keep states in bitsandbytes' 8-bit format)."
    )
    seed: int = Field(
        3407, ge=0, lt=2**32, description="Seed of LoRA init, data order and dropout (0 to 2^32-1)."
    )
    max_length: int = Field(2048, gt=0, description="Tokens per sample, image tokens included.")
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in backward (non-reentrant)."
    )
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(500, gt=0, description="Checkpoint every N steps.")
    save_total_limit: int | None = Field(
        2, gt=0, description="Keep at most N complete checkpoints (null: all)."
    )
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (needs data.eval).")
    eval_generate: bool = Field(
        False,
        description="After training, generate answers on data.eval with the base and the adapter and score them "
        "(exact match, contains answer) into 4-eval/eval_report.json, like `vlmtune eval`.",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader workers that decode and process images.")
    divergence_checks: bool = Field(
        True,
        description="Stop a run that collapsed or diverged without a NaN (weights growing by orders of magnitude, "
        "a gradient norm of 0 for several steps, the loss far above its start) as failed, keeping the last good "
        "checkpoint (docs/reliability.md). The NaN/inf guard is always on.",
    )
    supervised_loss: bool = Field(
        True,
        description="Project only labelled positions through lm_head (same loss, far less work and memory).",
    )
    group_by_length: bool = Field(
        True,
        description="Batch samples of similar length together to cut padding (sft, dpo; a grpo batch is "
        "whole groups of one prompt's completions).",
    )
    torch_compile: bool = Field(
        False, description="torch.compile the model (CUDA; first steps pay the compile)."
    )
    device: Device = Field("auto", description="auto = CUDA when available.")
    distributed: DistributedSection = Field(
        default_factory=DistributedSection,
        description="Under torchrun / accelerate launch: the strategy (ddp or fsdp) and the collective timeout.",
    )

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, value: int) -> int:
        if value == 0:
            raise ValueError(
                "0 steps would train nothing; give a positive number, or -1 to train `epochs` epochs"
            )
        return value


class OutputSection(Section):
    dir: str = Field("runs", description="Folder that holds run folders (relative to the recipe).")
    name: str | None = Field(
        None, description="Run name (one folder name, no path); default: the recipe file's stem."
    )
    report_to: list[Tracker] = Field(
        default_factory=list,
        description="Experiment trackers to send the logged metrics to (the trainer's report_to), e.g. "
        "[tensorboard] (event files in 3-train/tensorboard/) or [wandb, mlflow]; each must be installed. "
        "metrics.jsonl is written either way.",
    )

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, value: str | None) -> str | None:
        if value is not None and (value in ("", ".", "..") or "/" in value or "\\" in value or "\0" in value):
            raise ValueError(
                f"{value!r} is not a single folder name; run folders go inside output.dir, so give a plain "
                "name (set output.dir to change where)"
            )
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_none(cls, value: Any) -> Any:
        """`report_to: wandb` and `report_to: none`, as HF configs write them."""
        if value is None or value == "none":
            return []
        return [value] if isinstance(value, str) else value
