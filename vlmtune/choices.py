"""The closed sets of words a recipe accepts, each written once.

The recipe schema (vlmtune/recipe/) types its fields with these aliases, and everything else
(the memory model, the CLI's options) reads them from here. They live apart from the schema
only so that the CLI can read them without importing pydantic (`vlmtune --help` stays fast).
"""

from __future__ import annotations

from typing import Literal, get_args

Dtype = Literal["bfloat16", "float16", "float32"]
Optimizer = Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"]
QuantBits = Literal[4, 8]
QuantType = Literal["nf4", "fp4"]
LoraMethod = Literal["lora", "dora", "full"]  # dora: LoRA plus a trained magnitude per output (peft use_dora)
# How the adapters start (peft init_lora_weights): kaiming is peft's default (A Kaiming-uniform, B zero)
LoraInit = Literal["kaiming", "gaussian", "pissa", "olora", "loftq"]
LoraBias = Literal["none", "all", "lora_only"]
DataFormat = Literal[
    "auto", "messages", "sharegpt", "prompt_completion", "exchanges", "query_response", "columns"
]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
Device = Literal["auto", "cpu", "cuda"]
Objective = Literal[
    "sft", "dpo", "grpo", "kto"
]  # what the train stage optimises; each has a module in vlmtune/stages/
# TRL 1.16 DPOTrainer's pairwise losses (its "sft" term is the dpo section's sft_weight instead).
DpoLoss = Literal[
    "sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm",
]  # fmt: skip
DpoReference = Literal["start", "base"]  # the frozen model DPO measures its rewards against
# TRL 1.16 GRPOTrainer's policy losses that need no knob beyond the grpo section's.
GrpoLoss = Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"]
# grpo.importance_sampling_level: one policy ratio per token (GRPO) or per completion (GSPO)
ImportanceSampling = Literal["token", "sequence"]
# TRL 1.16 KTOTrainer's losses: kto (with the KL baseline of mismatched answers), apo_zero_unpaired (none)
KtoLoss = Literal["kto", "apo_zero_unpaired"]
RewardScaling = Literal["group", "batch", "none"]  # what a reward is divided by to form its advantage
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
KernelsMode = Literal["auto", "off"]  # train.kernels: the Triton kernels (vlmtune/kernels) or none
# The answer metrics (vlmtune/scoring/metrics.py; a test keeps the two lists equal)
AnswerMetric = Literal["exact_match", "contains", "number", "anls", "cer", "wer", "rouge_l", "bleu", "chrf"]
Strategy = Literal["ddp", "fsdp"]  # how ranks share the work under torchrun / accelerate launch
# Experiment trackers the HF Trainer reports to (its `report_to`); vlmtune/observe/trackers.py knows
# what each needs installed.
Tracker = Literal[
    "tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "clearml", "neptune", "dvclive", "swanlab",
    "codecarbon", "azure_ml", "dagshub", "flyte",
]  # fmt: skip

# quantization.bits values that mean "keep every weight in model.dtype" (besides null).
NO_QUANTIZATION = ("none", "null", "16", "off")

DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}  # one entry per Dtype


def words(alias) -> tuple[str, ...]:
    """The values of a Literal alias as strings, for help texts and messages."""
    return tuple(str(v) for v in get_args(alias))
