"""The recipe schema: one strict pydantic model per section, and load_recipe().

Every default lives here, nowhere else. Unknown keys are rejected, every problem is reported at
once with its key path, its YAML line and a did-you-mean, and the validated recipe is frozen.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from vlmtune import safe_yaml
from vlmtune.choices import (
    NO_QUANTIZATION,
    AttnImplementation,
    DataFormat,
    Device,
    DpoLoss,
    DpoReference,
    Dtype,
    GrpoLoss,
    LoraBias,
    LoraMethod,
    Objective,
    Optimizer,
    QuantBits,
    QuantType,
    RewardScaling,
    Scheduler,
    Strategy,
    Tracker,
    words,
)
from vlmtune.errors import RecipeError
from vlmtune.paths import TINY_PREFIX, written_as_path


class Strict(BaseModel):
    # allow_inf_nan: no nan/inf in any number of a recipe (a learning rate of .inf validated before).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Section(Strict):
    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's true/false would pass as 1/0 for a number (pydantic's lax mode): refuse them."""
        if isinstance(value, bool) and info.field_name and _wants_number(cls.model_fields[info.field_name]):
            raise ValueError(f"expects a number, got {str(value).lower()}")
        return value


def _wants_number(field: FieldInfo) -> bool:
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
            from vlmtune.families import family_names

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


class DpoSection(Section):
    """Knobs of preference tuning (train.objective: dpo), run through TRL's DPOTrainer."""

    SMOOTHED_LOSSES: ClassVar[tuple[str, ...]] = ("robust", "exo_pair", "aot", "aot_unpaired")

    beta: float = Field(
        0.1,
        gt=0,
        description="How far the model may move from the reference: higher keeps it closer (for ipo, the "
        "regularisation tau). Rewards are beta times the log-probability ratio to the reference.",
    )
    loss_type: DpoLoss = Field(
        "sigmoid",
        description="The preference loss: sigmoid = DPO; ipo = IPO (squared, length-normalised); hinge = SLiC; "
        "robust = DPO with noisy labels (label_smoothing); the others as TRL's DPOTrainer names them.",
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of a supervised loss on the chosen answers added to the preference loss (RPO). "
        "Pure DPO can lower the chosen answer's own likelihood and break its end-of-turn token on short "
        "answers; 0.2-1.0 keeps answers well formed.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Assumed share of flipped preference labels (robust, aot, aot_unpaired) or EXO's epsilon "
        "(exo_pair needs it above 0). The other losses do not read it.",
    )
    reference: DpoReference = Field(
        "start",
        description="The frozen model rewards are measured against. start: the model training starts from (the "
        "base for a fresh adapter; model.adapter's adapter, frozen, when continuing a run; a frozen copy for full "
        "fine-tuning). base: the base model even when model.adapter continues a run (LoRA only).",
    )

    @model_validator(mode="after")
    def _smoothing_is_read(self) -> DpoSection:
        if self.label_smoothing and self.loss_type not in self.SMOOTHED_LOSSES:
            raise ValueError(
                f"dpo.label_smoothing is set but loss_type {self.loss_type} does not read it; use loss_type robust "
                f"(conservative DPO) or one of {', '.join(self.SMOOTHED_LOSSES)}, or drop label_smoothing"
            )
        if self.loss_type == "exo_pair" and not self.label_smoothing:
            raise ValueError(
                "dpo.loss_type exo_pair needs dpo.label_smoothing above 0 (EXO's epsilon, e.g. 1e-3)"
            )
        return self


# --- grpo: rewards and knobs ---------------------------------------------------------------------

REWARD_NAME = re.compile(r"[a-z][a-z0-9_]*")  # becomes a metrics key: reward_<name>
RESERVED_REWARD_NAMES = ("std", "group_std")  # reward_std, reward_group_std are the total's spreads
MODULE_FUNCTION = re.compile(r"(?P<module>[^:]+):(?P<function>[A-Za-z_][A-Za-z0-9_]*)")


class RewardSpec(Strict):
    """One of grpo.rewards: a member of a union told apart by `type`, on which pydantic allows no
    field validator; so booleans for numbers are refused for the whole reward, naming the key."""

    type: str = Field(description="The kind of reward (each kind narrows it to its own word).")

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and _wants_number(field):
                    raise ValueError(f"{key} expects a number, got {str(value).lower()}")
        return data

    weight: float = Field(
        1.0,
        description="Its share of the total reward (negative: a penalty; 0: logged, never trained on).",
    )
    name: str | None = Field(
        None,
        description="The name its metrics are logged under (reward_<name> in metrics.jsonl); default: the type, "
        "or the function's name.",
    )

    @field_validator("name")
    @classmethod
    def _metric_key(cls, value: str | None) -> str | None:
        if value is not None and not REWARD_NAME.fullmatch(value):
            raise ValueError(
                f"reward name {value!r} must be lower case letters, digits and _ (a metrics key)"
            )
        if value in RESERVED_REWARD_NAMES:
            raise ValueError(
                f"reward name {value!r} is taken by the total reward's reward_{value}; pick another"
            )
        return value

    @property
    def label(self) -> str:
        """The stable name of this reward in metrics.jsonl and completions.jsonl."""
        return self.name or self.type


class ExactMatchReward(RewardSpec):
    """1 when the completion equals the reference answer (case, spaces and trailing punctuation aside)."""

    type: Literal["exact_match"]


class ContainsReward(RewardSpec):
    """1 when the completion contains the reference answer (compared as exact_match compares)."""

    type: Literal["contains"]


class RegexReward(RewardSpec):
    """1 when the whole completion (outer whitespace aside) matches ``pattern``; `.` also matches newlines."""

    type: Literal["regex"]
    pattern: str = Field(description="A Python regular expression the whole completion must match.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"pattern {value!r} is not a valid regular expression: {exc}") from None
        return value


class NumberReward(RewardSpec):
    """1 when the last number in the completion is within tolerance of the reference's last number."""

    type: Literal["number"]
    tolerance: float = Field(0.0, ge=0, description="Absolute difference accepted.")
    relative_tolerance: float = Field(
        0.0, ge=0, description="Difference accepted as a fraction of the reference (0.01 = 1%)."
    )


class LengthReward(RewardSpec):
    """0 up to ``max_tokens`` completion tokens, then falling linearly to -1 at twice that."""

    type: Literal["length"]
    max_tokens: int = Field(gt=0, description="Completion tokens allowed before the penalty starts.")


class FunctionReward(RewardSpec):
    """A Python function of yours; runs only with grpo.allow_code: true (docs/rl.md has its signature)."""

    type: Literal["function"]
    function: str = Field(
        description="module:function, e.g. my_rewards:brevity (my_rewards.py beside the recipe, or an "
        "importable module), or path/to/file.py:function."
    )

    @field_validator("function")
    @classmethod
    def _module_colon_function(cls, value: str) -> str:
        if not MODULE_FUNCTION.fullmatch(value):
            raise ValueError(f"{value!r} is not module:function (e.g. my_rewards:brevity)")
        return value

    @property
    def label(self) -> str:
        return self.name or MODULE_FUNCTION.fullmatch(self.function)["function"].lower()


Reward = Annotated[
    ExactMatchReward | ContainsReward | RegexReward | NumberReward | LengthReward | FunctionReward,
    Field(discriminator="type"),
]
REWARD_KINDS = get_args(get_args(Reward)[0])  # the reward classes, for docs and checks


class GrpoSection(Section):
    """Knobs of online RL (train.objective: grpo), run through TRL's GRPOTrainer."""

    num_generations: int = Field(
        4,
        ge=2,
        description="Completions sampled per prompt; each is rewarded against the others of its group. "
        "train.batch_size x train.grad_accum (completions per optimizer step) must be a multiple of it.",
    )
    max_completion_length: int = Field(
        128,
        gt=0,
        description="New tokens per completion at most; longer ones are cut (see completions_clipped).",
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the completions.")
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens this likely."
    )
    beta: float = Field(
        0.04,
        ge=0,
        description="Weight of the KL penalty to the model training started from (logged as kl); 0 drops the "
        "reference forward pass and the kl metric.",
    )
    loss_type: GrpoLoss = Field(
        "dapo",
        description="How token losses are averaged: dapo (tokens of the whole batch), grpo (per completion, then "
        "per batch), dr_grpo (a constant: no length bias), bnpo (tokens of the local batch), cispo, sapo (as in "
        "TRL's GRPOTrainer).",
    )
    scale_rewards: RewardScaling = Field(
        "group",
        description="Advantages are rewards minus their group's mean, divided by the std of the group, of the "
        "batch, or none (Dr. GRPO).",
    )
    rewards: list[Reward] = Field(
        min_length=1,
        description="What a completion is scored by, each weighted and logged as reward_<name>: exact_match, "
        "contains, regex, number, length, or a function of yours (see below and docs/rl.md).",
    )
    allow_code: bool = Field(
        False,
        description="Let a `type: function` reward import and run your Python code; without it such a recipe is "
        "refused before anything loads.",
    )
    completions_to_log: int = Field(
        8, ge=0, description="Completions written to 3-train/completions.jsonl at each logging step."
    )

    @model_validator(mode="after")
    def _rewards_named_once_and_code_allowed(self) -> GrpoSection:
        labels = [reward.label for reward in self.rewards]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(
                f"two rewards would be logged as {', '.join(twice)}; give each a different `name`"
            )
        code = [reward.function for reward in self.rewards if isinstance(reward, FunctionReward)]
        if code and not self.allow_code:
            raise ValueError(
                f"rewards name Python code ({', '.join(code)}) but grpo.allow_code is false: a recipe never runs "
                "code unless it says so; set grpo.allow_code: true if you trust that code"
            )
        return self


# Keys only some objectives read, with the reason; a value other than the default under another
# objective is an error (the default itself is accepted: resolved.yaml writes every key).
OBJECTIVE_ONLY: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("data", "train_on_responses_only"): (
        ("sft",),
        "preference pairs are always scored on their answers only, GRPO's completions too",
    ),
    ("train", "supervised_loss"): (
        ("sft",),
        "DPO scores answers with TRL's chunked log-probabilities, and so does GRPO",
    ),
    ("lora", "dropout"): (
        ("sft",),
        "DPO turns dropout off so the model and its reference score answers alike; so does GRPO",
    ),
}


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


class Recipe(Section):
    model: ModelSection
    quantization: QuantizationSection = QuantizationSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection = TrainSection()
    output: OutputSection = OutputSection()
    dpo: DpoSection | None = Field(
        None, description="Read when train.objective is dpo (filled with its defaults then)."
    )
    grpo: GrpoSection | None = Field(
        None, description="Read when train.objective is grpo (its rewards are required then)."
    )

    @model_validator(mode="before")
    @classmethod
    def _chosen_objective_has_its_section(cls, raw: Any) -> Any:
        """The chosen objective's section takes its defaults when the recipe leaves it out."""
        if not isinstance(raw, dict):
            return raw
        train = raw.get("train")
        objective = train.get("objective") if isinstance(train, dict) else getattr(train, "objective", None)
        if isinstance(objective, str) and objective in cls.model_fields and raw.get(objective) is None:
            return {**raw, objective: {}}
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.lora.method == "full" and self.quantization.bits is not None:
            raise ValueError(
                "lora.method full cannot train quantized weights; set quantization.bits: null, or use lora"
            )
        if self.train.distributed.strategy == "fsdp":
            _check_fsdp(self)
        if self.train.eval_steps and not self.data.eval:
            raise ValueError(
                "train.eval_steps is set but data.eval is empty; give data.eval or drop eval_steps"
            )
        self._objective_keys_apply()
        dpo = self.dpo
        if dpo and dpo.reference == "base" and self.model.adapter and self.lora.method == "full":
            raise ValueError(
                "dpo.reference base with lora.method full and model.adapter would need the base as a second full "
                "copy; use reference: start (the run's weights, frozen), or continue a LoRA run"
            )
        if self.grpo is not None:
            self._grpo_batches_hold_whole_groups(self.grpo)
        return self

    def _objective_keys_apply(self) -> None:
        objective = self.train.objective
        for other in words(Objective):
            if other != objective and getattr(self, other, None) is not None:
                raise ValueError(
                    f"a `{other}:` section is given but train.objective is {objective}; set train.objective: "
                    f"{other}, or remove the section"
                )
        for (section, key), (readers, why) in OBJECTIVE_ONLY.items():
            part = getattr(self, section)
            if objective not in readers and getattr(part, key) != type(part).model_fields[key].default:
                raise ValueError(
                    f"{section}.{key} applies to {' and '.join(readers)} only, and train.objective is {objective} "
                    f"({why}); remove it"
                )

    def _grpo_batches_hold_whole_groups(self, grpo: GrpoSection) -> None:
        per_step = self.train.batch_size * self.train.grad_accum
        if per_step % grpo.num_generations:
            raise ValueError(
                f"train.batch_size x train.grad_accum = {per_step} completions per optimizer step is not a multiple "
                f"of grpo.num_generations {grpo.num_generations}: every prompt needs its whole group of completions "
                "in one step; change batch_size, grad_accum or num_generations"
            )
        if self.train.eval_steps and self.train.batch_size % grpo.num_generations:
            raise ValueError(
                f"train.batch_size {self.train.batch_size} is not a multiple of grpo.num_generations "
                f"{grpo.num_generations}, which evaluation needs (one group per held-out prompt per batch)"
            )

    def objective_options(self) -> Section | None:
        """The section of knobs of the chosen objective (a top-level section named after it), if any."""
        return getattr(self, self.train.objective, None)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _check_fsdp(recipe: Recipe) -> None:
    """What FSDP cannot shard, refused before anything loads."""
    if recipe.quantization.bits == 8:
        raise ValueError(
            "train.distributed.strategy fsdp cannot shard 8-bit (LLM.int8) weights; use quantization.bits: 4 "
            "(QLoRA: the 4-bit weights are stored in model.dtype so FSDP can shard them) or null, or strategy: ddp"
        )
    if recipe.train.eval_generate:
        raise ValueError(
            "train.eval_generate cannot run under strategy fsdp (generation would need every rank); set it to "
            "false and run `vlmtune eval RUN_DIR` on the finished run"
        )


# --- loading -----------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, validate. Raises RecipeError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}", hint="pass the path of a .yaml recipe (see recipes/)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})",
            hint="save the recipe as UTF-8 (a binary or damaged file cannot be a recipe)",
        ) from None
    return parse_recipe(text, source=str(path), base_dir=path.resolve().parent, overrides=overrides)


def parse_recipe(
    text: str, *, source: str = "<recipe>", base_dir: Path | None = None, overrides: list[str] | None = None
) -> Recipe:
    document = safe_yaml.load(text, source)
    raw = {} if document.data is None else document.data
    if not isinstance(raw, dict):
        raise RecipeError(f"{source} must be a mapping of sections (model:, data:, ...)")
    overridden = apply_overrides(raw, overrides or [])
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err, document.lines, overridden) for err in exc.errors()]
        raise RecipeError(
            f"{source} has {len(problems)} problem{'s' * (len(problems) > 1)}:",
            problems,
            hint="the recipe reference is docs/recipe-reference.md; `vlmtune schema` gives editors the schema",
        ) from None
    return _resolve_paths(recipe, base_dir) if base_dir else recipe


def apply_overrides(raw: dict, overrides: list[str]) -> set[tuple[str, ...]]:
    """Apply ``a.b=value`` overrides in place; values are parsed as YAML (so 4, true, null work)."""
    touched = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(
                f"bad override {item!r}", hint="write --set section.key=value, e.g. --set lora.r=32"
            )
        keys = tuple(key.strip().split("."))
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise RecipeError(f"bad override {item!r}: {k} is not a section")
        try:
            node[keys[-1]] = safe_yaml.load_value(value, "the value") if value.strip() else None
        except RecipeError as exc:
            raise RecipeError(
                f"bad override {item!r}: {exc.message}",
                hint=f"quote a value that starts with [, {{, *, & or !: --set '{key.strip()}=\"{value}\"'",
            ) from None
        touched.add(keys)
    return touched


def _resolve_paths(recipe: Recipe, base_dir: Path) -> Recipe:
    """Paths in a recipe are relative to its folder; make them absolute so later stages need no base."""

    def local(value: str | None, *, must_look_local: bool) -> str | None:
        if value is None or value.startswith(TINY_PREFIX):
            return value
        candidate = Path(value).expanduser()
        if not candidate.is_absolute():
            candidate = base_dir / candidate
        if candidate.exists() or (must_look_local and written_as_path(value)):
            return str(candidate.resolve())
        return value  # a hub id

    data = recipe.data.model_copy(
        update={
            "train": local(recipe.data.train, must_look_local=True),
            "eval": local(recipe.data.eval, must_look_local=True),
            "image_root": local(recipe.data.image_root, must_look_local=True),
        }
    )
    model = recipe.model.model_copy(
        update={
            "name": local(recipe.model.name, must_look_local=True),
            "adapter": local(recipe.model.adapter, must_look_local=True),
        }
    )
    grpo = recipe.grpo and recipe.grpo.model_copy(
        update={"rewards": [_beside(reward, base_dir) for reward in recipe.grpo.rewards]}
    )
    out_dir = Path(recipe.output.dir).expanduser()
    output = recipe.output.model_copy(
        update={"dir": str(out_dir if out_dir.is_absolute() else (base_dir / out_dir).resolve())}
    )
    return recipe.model_copy(update={"data": data, "model": model, "output": output, "grpo": grpo})


def _beside(reward: Any, base_dir: Path) -> Any:
    """A function reward whose module is a file beside the recipe, named by its absolute path."""
    if not isinstance(reward, FunctionReward):
        return reward
    module, function = reward.function.rsplit(":", 1)
    relative = Path(module) if module.endswith(".py") else Path(*module.split(".")).with_suffix(".py")
    candidate = relative.expanduser() if relative.expanduser().is_absolute() else base_dir / relative
    if not candidate.is_file():
        return reward  # an importable module (or a missing file, reported when the run starts)
    return reward.model_copy(update={"function": f"{candidate.resolve()}:{function}"})


# --- error messages with line numbers ----------------------------------------------------------


def _describe(err: dict, lines: dict[tuple[str, ...], int], overridden: set[tuple[str, ...]]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(loc) or "recipe"
    if loc in overridden:
        where = " (from --set)"
    elif loc in lines:
        where = f" (line {lines[loc]})"
    elif loc[:-1] in lines:
        where = f" (in the section at line {lines[loc[:-1]]})"
    else:
        where = ""
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key" + _suggestion(loc)
    elif err["type"] == "missing":
        message = "required, but missing"
    elif "input" in err and err["type"] not in ("value_error", "model_type"):
        message = f"{message} (got {err['input']!r})"
    return f"{dotted}{where}: {message}"


# Names users bring from TRL, Axolotl, Unsloth and LLaMA-Factory configs -> ours.
ALIASES = {
    "rank": "lora.r",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "max_seq_length": "train.max_length",
    "sequence_len": "train.max_length",
    "cutoff_len": "train.max_length",
    "model_name_or_path": "model.name",
    "base_model": "model.name",
    "torch_dtype": "model.dtype",
    "load_in_4bit": "quantization.bits",
    "load_in_8bit": "quantization.bits",
    "output_dir": "output.dir",
    "lora_target_modules": "lora.target_modules",
    "reward_funcs": "grpo.rewards",
    "reward_weights": "grpo.rewards",
}


def _suggestion(loc: tuple[str, ...]) -> str:
    if loc[-1] in ALIASES:
        return f"; did you mean `{ALIASES[loc[-1]]}`?"
    sections = list(Recipe.model_fields)
    if len(loc) == 1:
        close = difflib.get_close_matches(loc[0], sections, n=1, cutoff=0.6)
        if close:
            return f"; did you mean `{close[0]}`?"
        owner = _section_with_field(loc[0])
        return f"; did you mean `{owner}.{loc[0]}`?" if owner else f"; sections are {', '.join(sections)}"
    if loc[0] not in sections:
        return ""
    if len(loc) > 2:  # a key of a nested section (train.distributed.*)
        return _nested_suggestion(loc)
    owner = _section_with_field(loc[1])
    if owner and owner != loc[0]:
        return f"; it belongs in the `{owner}` section"
    names = list(section_types()[loc[0]].model_fields)
    close = difflib.get_close_matches(loc[1], names, n=1, cutoff=0.6)
    return f"; did you mean `{loc[0]}.{close[0]}`?" if close else ""


def _nested_suggestion(loc: tuple[str, ...]) -> str:
    model: Any = Recipe
    for key in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return ""
        model = field.annotation
    names = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.6)
    return f"; did you mean `{'.'.join(loc[:-1])}.{close[0]}`?" if close else ""


def _section_with_field(name: str) -> str | None:
    for section, model in section_types().items():
        if name in model.model_fields:
            return section
    return None


def section_types() -> dict[str, type[Section]]:
    """Each top-level section's schema class (an objective's optional section unwrapped)."""
    types = {}
    for name, field in Recipe.model_fields.items():
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, Section)):
            annotation = next(
                t for t in get_args(annotation) if isinstance(t, type) and issubclass(t, Section)
            )
        types[name] = annotation
    return types


def recipe_json_schema() -> dict:
    return Recipe.model_json_schema()
