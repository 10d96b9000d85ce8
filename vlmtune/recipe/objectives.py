"""The sections of the objectives that have knobs: dpo, kto, and grpo with its rewards; and the keys of
the common sections that only some objectives read."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import Field, field_validator, model_validator

from vlmtune.choices import DpoLoss, DpoReference, GrpoLoss, ImportanceSampling, KtoLoss, RewardScaling
from vlmtune.recipe.sections import MODULE_FUNCTION, Section, Strict, wants_number


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


class KtoSection(Section):
    """Knobs of unpaired preference tuning (train.objective: kto), run through TRL's KTOTrainer."""

    beta: float = Field(
        0.1,
        gt=0,
        description="How far the model may move from the reference: higher keeps it closer. Rewards are beta times "
        "the log-probability ratio of an answer to the reference.",
    )
    loss_type: KtoLoss = Field(
        "kto",
        description="kto: a good answer's reward is pushed above, a bad one's below, the batch's KL estimate "
        "(each prompt scored with another sample's answer: train.batch_size of 2 or more); apo_zero_unpaired: "
        "good answers up and bad ones down without that baseline (no extra forward passes).",
    )
    desirable_weight: float = Field(
        1.0,
        gt=0,
        description="Weight of the good answers' losses. With unequal counts, KTO's paper keeps desirable_weight x "
        "good answers / (undesirable_weight x bad answers) between 1 and 4/3.",
    )
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of the bad answers' losses.")
    reference: DpoReference = Field(
        "start",
        description="The frozen model rewards are measured against, as dpo.reference: start (the model training "
        "starts from) or base (the base model even when model.adapter continues a run; LoRA only).",
    )


# --- grpo: rewards and knobs ---------------------------------------------------------------------

REWARD_NAME = re.compile(r"[a-z][a-z0-9_]*")  # becomes a metrics key: reward_<name>
RESERVED_REWARD_NAMES = ("std", "group_std")  # reward_std, reward_group_std are the total's spreads


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
                if isinstance(value, bool) and field is not None and wants_number(field):
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
        "per batch), dr_grpo (a constant: no length bias), bnpo (tokens of the local batch), cispo, sapo, vespo "
        "(as in TRL's GRPOTrainer); luspo (GSPO scaled by completion length: importance_sampling_level sequence).",
    )
    importance_sampling_level: ImportanceSampling = Field(
        "token",
        description="The policy ratio the loss clips: one per token (GRPO) or one per completion, the mean of its "
        "tokens' log-ratios (GSPO; use with loss_type grpo, or luspo). vlmtune updates on-policy, where both "
        "ratios are 1 and the two give the same gradient (docs/rl.md).",
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

    # Losses that sum per-token terms: with one ratio per completion they weight each by its length (TRL).
    TOKEN_SUMMING_LOSSES: ClassVar[tuple[str, ...]] = ("dapo", "bnpo", "dr_grpo", "cispo")

    @model_validator(mode="after")
    def _ratio_fits_the_loss(self) -> GrpoSection:
        level, loss = self.importance_sampling_level, self.loss_type
        if loss == "luspo" and level != "sequence":
            raise ValueError(
                "grpo.loss_type luspo is GSPO's loss scaled by completion length: it needs "
                "grpo.importance_sampling_level: sequence"
            )
        if loss == "vespo" and level != "token":
            raise ValueError(
                "grpo.loss_type vespo computes its own per-completion weights from the token ratios: keep "
                "grpo.importance_sampling_level: token"
            )
        if level == "sequence" and loss in self.TOKEN_SUMMING_LOSSES:
            raise ValueError(
                f"grpo.importance_sampling_level sequence (GSPO) with loss_type {loss} sums one ratio per token of "
                "each completion, weighting completions by their length instead of GSPO's per-completion objective; "
                "set grpo.loss_type: grpo (the GSPO paper's), luspo or sapo"
            )
        return self

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
        "preference pairs (dpo) and unpaired answers (kto) are always scored on their answers only, GRPO's completions too",
    ),
    ("train", "supervised_loss"): (
        ("sft",),
        "DPO and KTO score answers with TRL's chunked log-probabilities, and so does GRPO",
    ),
    ("train", "eval_generate_steps"): (
        ("sft",),
        "DPO is measured by held-out preference accuracy and GRPO by held-out reward, both at train.eval_steps",
    ),
    ("train", "packing"): (
        ("sft",),
        "a DPO pair's chosen and rejected answers are scored side by side against one reference, and GRPO's "
        "completions are sampled during the step, so their lengths are unknown before it: neither is packed",
    ),
    ("train", "max_tokens_per_batch"): (("sft",), "it is the budget of train.packing, which only sft reads"),
    ("lora", "dropout"): (
        ("sft",),
        "DPO turns dropout off so the model and its reference score answers alike; so do KTO and GRPO",
    ),
}
