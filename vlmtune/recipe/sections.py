"""The sections of a recipe every objective reads: model, quantization, lora, data, train (with its
distributed part) and output, each with its defaults and its own checks."""

from __future__ import annotations

import difflib
import re
from types import UnionType
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from vlmtune.choices import (
    NO_QUANTIZATION,
    AnswerMetric,
    AttnImplementation,
    DataFormat,
    Device,
    Dtype,
    KernelsMode,
    LoraBias,
    LoraInit,
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

MODULE_FUNCTION = re.compile(r"(?P<module>[^:]+):(?P<function>[A-Za-z_][A-Za-z0-9_]*)")


class Strict(BaseModel):
    # allow_inf_nan: no nan/inf in any number of a recipe (a learning rate of .inf validated before).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Section(Strict):
    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Pydantic's lax mode would take YAML's true/false as 1/0 for a number, and "yes", "on", 1 or
        "false" as a boolean (an opt-in such as grpo.allow_code set by `allow_code: "no"` would be
        on): refuse both; a boolean is written true or false."""
        if not info.field_name:
            return value
        field = cls.model_fields[info.field_name]
        if isinstance(value, bool) and wants_number(field):
            raise ValueError(f"expects a number, got {str(value).lower()}")
        if not isinstance(value, bool) and wants_bool(field) and value is not None:
            raise ValueError(f"expects true or false, got {value!r} ({type(value).__name__})")
        return value


def _options(field: FieldInfo) -> tuple:
    annotation = field.annotation
    return get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)


def wants_number(field: FieldInfo) -> bool:
    options = _options(field)
    return bool(set(options) & {int, float}) and bool not in options


def wants_bool(field: FieldInfo) -> bool:
    """A boolean (or boolean-or-null) field, which takes nothing but true and false."""
    return set(_options(field)) - {type(None)} == {bool}


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
    adapter_checkpoint: str | None = Field(
        None,
        description="Which weights of the model.adapter run to start from: null takes those predict, eval and "
        "export use (its best checkpoint when it kept one, see train.best_metric; else its final weights); "
        "last its final weights; best insists on the best checkpoint; 40 or checkpoint-40 a checkpoint it kept.",
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

    @field_validator("adapter_checkpoint", mode="before")
    @classmethod
    def _checkpoint_word(cls, value: Any) -> Any:
        """last, best, a step or checkpoint-STEP (the words of --checkpoint); a bare YAML number is a step."""
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and not re.fullmatch(r"last|best|(checkpoint-)?\d+", value):
            raise ValueError(f"expects last, best, a step (40) or checkpoint-40, got {value!r}")
        return value

    @model_validator(mode="after")
    def _checkpoint_needs_a_run(self) -> ModelSection:
        if self.adapter_checkpoint is not None and self.adapter is None:
            raise ValueError(
                "model.adapter_checkpoint picks weights of the model.adapter run, and model.adapter is not set; "
                "set model.adapter to an earlier run folder, or remove adapter_checkpoint"
            )
        return self


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
    method: LoraMethod = Field(
        "lora",
        description="lora trains adapters; dora trains adapters plus a magnitude per output channel (DoRA, peft "
        "use_dora: closer to full fine-tuning, some step time and memory more); full trains every weight.",
    )
    init: LoraInit = Field(
        "kaiming",
        description="How the adapters start. kaiming: peft's default (A Kaiming-uniform, B zero: the model starts "
        "as the base); gaussian: A from a normal of std 1/r; pissa: A and B take the r principal singular "
        "directions of each weight, the base keeps the rest (16-bit base only); olora: A and B from a QR "
        "decomposition of each weight, the base keeps the rest; loftq: on a 4-bit base, A and B start as the "
        "low-rank part of each weight's quantization error (read from the checkpoint's 16-bit safetensors). pissa "
        "and olora rewrite the base weights, so their adapters only fit a base rewritten the same way (peft "
        "does it again when it loads them; docs/methods.md).",
    )
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
    def _init_needs_adapters(self) -> LoraSection:
        if self.method == "full" and self.init != "kaiming":
            raise ValueError(
                f"lora.init {self.init} initialises adapters, and lora.method full trains no adapter; drop lora.init "
                "or use method lora (or dora)"
            )
        if self.method == "dora" and self.init == "loftq":
            raise ValueError(
                "lora.init loftq with lora.method dora: DoRA's magnitudes are measured from the weights before LoftQ "
                "sets the adapters, so the model would not start as the base; use method lora with loftq, or dora "
                "with kaiming, gaussian, pissa or olora"
            )
        return self

    @model_validator(mode="after")
    def _something_to_train(self) -> LoraSection:
        if self.method == "full" or self.target_modules:
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
        "validation",
        description="Split of a hub dataset or a save_to_disk DatasetDict read for `eval`; `validation` "
        "falls back to `test` when the set has no validation split.",
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
    follow_symlinks: bool = Field(
        False,
        description="Let a relative image path follow symlinks out of the image root (an image folder linked "
        "into the data folder, the hub cache's blobs). Off: a path must lead inside the root once its links are "
        "resolved, so a link in a dataset cannot read any file on the machine.",
    )
    multi_frame_images: Literal["first_frame", "error"] = Field(
        "first_frame",
        description="An animated GIF/PNG/WebP or a multi-page TIFF: first_frame trains on its first frame (counted "
        "in the data report as images_multi_frame, with a warning); error refuses the sample (a bad sample, "
        "per on_bad_sample).",
    )
    allow_urls: bool = Field(
        False,
        description="Let samples fetch http(s) image URLs (off: such samples are refused with a reason).",
    )
    url_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds one image URL may take in all (name lookup, connection, every read) when allow_urls "
        "is on.",
    )
    url_max_bytes: int = Field(
        64 << 20,
        gt=0,
        description="Bytes one image URL may send at most (64 MiB); a larger answer is refused before or while it "
        "downloads.",
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
    lr_vision: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate of what trains in the vision tower (its adapters, or its weights under "
        "lora.method full); null: train.lr. Each lr_* set makes an optimizer group, listed in 2-lora/lora_plan.json "
        "and logged as learning_rate_<group> in metrics.jsonl.",
    )
    lr_projector: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate of the vision-to-language projector (lora.train_projector, or full); null: "
        "train.lr.",
    )
    lr_language: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate of what trains in the language model (lm_head included under full); null: "
        "train.lr.",
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: the B matrices learn at this multiple of their component's learning rate (the paper and "
        "peft suggest 16); null: the same rate as A. LoRA and DoRA only.",
    )
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
    eval_generate_steps: int | None = Field(
        None,
        gt=0,
        description="Every N steps, generate greedy answers on data.eval (sft) and score them with train.metrics: "
        "eval_<metric> rows in metrics.jsonl, the curves and the trackers.",
    )
    eval_max_samples: int | None = Field(
        None,
        gt=0,
        description="Answers generated at each eval_generate_steps: a sample of N eval samples drawn with "
        "train.seed, the same at every step (null: all of data.eval).",
    )
    eval_max_new_tokens: int = Field(64, gt=0, description="New tokens per answer at eval_generate_steps.")
    metrics: list[AnswerMetric] = Field(
        default_factory=lambda: list(get_args(AnswerMetric)),
        description="Answer metrics at eval_generate_steps and in `vlmtune eval` (docs/after-training.md defines "
        "each): exact_match, contains, number, anls, cer, wer, rouge_l, bleu, chrf.",
    )
    number_tolerance: float = Field(
        0.0, ge=0, description="metric number: absolute difference accepted from the reference's last number."
    )
    number_relative_tolerance: float = Field(
        0.0,
        ge=0,
        description="metric number: difference accepted as a fraction of the reference (0.01 = 1%).",
    )
    metric_function: str | None = Field(
        None,
        description="A metric of yours, module:function (my_metrics.py beside the recipe -> my_metrics:score), "
        "called with predictions, references and prompts, returning one number; logged as eval_<function>. "
        "Runs only with train.allow_metric_code: true.",
    )
    allow_metric_code: bool = Field(
        False, description="Let train.metric_function import and run your Python code."
    )
    best_metric: str | None = Field(
        None,
        description="The metric that picks the best checkpoint: loss (eval_loss, at eval_steps), a name of "
        "train.metrics or metric_function's function (at eval_generate_steps), preference_accuracy (dpo) or "
        "reward (grpo) at eval_steps. The best checkpoint is kept by rotation, named in summary.json and used by "
        "predict, eval and export. save_steps must be a multiple of the steps that measure it.",
    )
    greater_is_better: bool | None = Field(
        None, description="Direction of best_metric; null: the metric's own (lower for loss, cer, wer)."
    )
    early_stopping_patience: int | None = Field(
        None,
        gt=0,
        description="Stop when best_metric has not improved for N measurements in a row (needs best_metric).",
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
    packing: bool = Field(
        False,
        description="Pack whole samples into rows of up to max_tokens_per_batch tokens (sft; first-fit decreasing "
        "over the pre-flight's exact lengths), each sample attending only to itself: far less padding, the same "
        "loss. A family whose isolation is not proven is refused with the reason (docs/performance.md).",
    )
    max_tokens_per_batch: int | None = Field(
        None,
        gt=0,
        description="With packing: tokens per packed row, one row per device batch; null = max_length x "
        "batch_size. At least max_length (a sample is never split).",
    )
    heaviest_first: bool | None = Field(
        None,
        description="Run the batch with the most tokens as step 1, so an out-of-memory error comes in the first "
        "minute (packed rows; length-grouped batches already start with the longest). null = on where the "
        "device is a GPU.",
    )
    torch_compile: bool = Field(
        False, description="torch.compile the model (CUDA; first steps pay the compile)."
    )
    device: Device = Field("auto", description="auto = CUDA when available.")
    kernels: KernelsMode = Field(
        "off",
        description="Triton kernels for the hot paths (fused RMSNorm, rotary, SwiGLU/GeGLU, NF4 + LoRA matmul; "
        "docs/performance.md). auto = on CUDA, only the kernels bench/gpu.py measured faster than torch (none "
        "yet); never on CPU. off = transformers' own modules.",
    )
    offload_activations: bool = Field(
        False,
        description="Keep the tensors saved for backward (with gradient_checkpointing: each block's input) in "
        "pinned host memory, copied back when backward needs them: less GPU memory for long multi-image "
        "sequences, for some step time (docs/performance.md).",
    )
    cpu_threads: int | Literal["auto"] = Field(
        "auto",
        description="Torch threads of a run on CPU (a CUDA run is left alone). auto: what OMP_NUM_THREADS says "
        "when it is set (torchrun sets 1), else 1 thread per process on a machine of 4 cores or fewer per "
        "process (on 2 busy cores torch's default of 2 threads made the demo 2.4-8x slower, "
        "docs/benchmarks.md), else torch's default; a number sets it; 0 keeps torch's default.",
    )
    distributed: DistributedSection = Field(
        default_factory=DistributedSection,
        description="Under torchrun / accelerate launch: the strategy (ddp or fsdp) and the collective timeout.",
    )

    @field_validator("metric_function")
    @classmethod
    def _module_colon_function(cls, value: str | None) -> str | None:
        if value is not None and not MODULE_FUNCTION.fullmatch(value):
            raise ValueError(f"{value!r} is not module:function (e.g. my_metrics:score)")
        return value

    @model_validator(mode="after")
    def _best_metric_is_measured(self) -> TrainSection:
        if self.metric_function and not self.allow_metric_code:
            raise ValueError(
                f"train.metric_function names Python code ({self.metric_function}) but train.allow_metric_code is "
                "false: a recipe never runs code unless it says so; set allow_metric_code: true if you trust it"
            )
        if self.early_stopping_patience and not self.best_metric:
            raise ValueError(
                "train.early_stopping_patience needs train.best_metric (what must keep improving)"
            )
        if self.best_metric is None:
            return self
        answers = [*self.metrics, *([self.metric_function_name] if self.metric_function else [])]
        by_eval = ("loss", "preference_accuracy", "reward")
        if self.best_metric not in (*answers, *by_eval):
            raise ValueError(
                f"train.best_metric {self.best_metric!r} is not measured: use loss, preference_accuracy (dpo), "
                f"reward (grpo) or one of train.metrics ({', '.join(answers)})"
            )
        key, steps = (
            ("eval_steps", self.eval_steps) if self.best_metric in by_eval
            else ("eval_generate_steps", self.eval_generate_steps)
        )  # fmt: skip
        if not steps:
            raise ValueError(f"train.best_metric {self.best_metric} is measured at train.{key}; set it")
        if self.save_steps % steps:
            raise ValueError(
                f"train.save_steps {self.save_steps} is not a multiple of train.{key} {steps}: a checkpoint must be "
                f"saved where best_metric is measured; set save_steps to a multiple of {steps}"
            )
        return self

    @property
    def metric_function_name(self) -> str | None:
        return MODULE_FUNCTION.fullmatch(self.metric_function)["function"] if self.metric_function else None

    @property
    def packing_budget(self) -> int:
        """Tokens per packed row: max_tokens_per_batch, or max_length x batch_size."""
        return self.max_tokens_per_batch or self.max_length * self.batch_size

    @model_validator(mode="after")
    def _budget_holds_a_sample(self) -> TrainSection:
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < self.max_length:
            raise ValueError(
                f"max_tokens_per_batch {self.max_tokens_per_batch} is below max_length {self.max_length}: a sample "
                "of max_length tokens would fit no packed row; raise it (or lower max_length)"
            )
        return self

    @field_validator("cpu_threads")
    @classmethod
    def _threads_not_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("a thread count cannot be negative; give auto, 0 (torch's default) or a number")
        return value

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


# lora.init values that rewrite the base weights (the adapter holds what they took out of them)
REWRITES_BASE = ("pissa", "olora")


def check_lora_methods(lora: LoraSection, quantization: QuantizationSection, train: TrainSection) -> None:
    """The LoRA method, its start and LoRA+ against the quantization and the objective (ValueError)."""
    if train.loraplus_lr_ratio is not None and lora.method == "full":
        raise ValueError(
            "train.loraplus_lr_ratio sets the learning rate of LoRA's B matrices, and lora.method full has none; "
            "drop it, or use method lora (or dora)"
        )
    if lora.init == "pissa" and quantization.bits is not None:
        raise ValueError(
            f"lora.init pissa moves each weight's principal part into the adapter and keeps the rest as the base, "
            f"which peft can only do on a 16-bit base, not a {quantization.bits}-bit one; set quantization.bits: "
            "null, or use lora.init loftq (made for a 4-bit base) or olora"
        )
    if lora.init == "loftq" and quantization.bits != 4:
        raise ValueError(
            "lora.init loftq starts the adapters from the 4-bit quantization error of each weight, and this recipe "
            f"loads {'a 16-bit' if quantization.bits is None else 'an 8-bit'} base (no such error); set "
            "quantization.bits: 4, or use lora.init pissa for a 16-bit base"
        )
    if lora.init in REWRITES_BASE and train.objective != "sft":
        raise ValueError(
            f"lora.init {lora.init} with train.objective {train.objective}: TRL copies the adapter into a frozen "
            f"reference adapter, and peft would run the {lora.init} start again on the already rewritten base; "
            "train with objective sft (or lora.init kaiming, gaussian or loftq)"
        )
