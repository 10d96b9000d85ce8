"""The whole recipe: its sections, the checks that span several of them, and its schema."""

from __future__ import annotations

from typing import Any, get_args

import yaml
from pydantic import Field, model_validator

from vlmtune.choices import Objective, words
from vlmtune.recipe.objectives import OBJECTIVE_ONLY, DpoSection, GrpoSection, KtoSection
from vlmtune.recipe.sections import (
    DataSection,
    LoraSection,
    ModelSection,
    OutputSection,
    QuantizationSection,
    Section,
    TrainSection,
    check_lora_methods,
)


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
    kto: KtoSection | None = Field(
        None, description="Read when train.objective is kto (filled with its defaults then)."
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
        if self.train.eval_generate_steps and not self.data.eval:
            raise ValueError(
                "train.eval_generate_steps is set but data.eval is empty; give data.eval or drop eval_generate_steps"
            )
        if self.train.eval_steps and not self.data.eval:
            raise ValueError(
                "train.eval_steps is set but data.eval is empty; give data.eval or drop eval_steps"
            )
        check_lora_methods(self.lora, self.quantization, self.train)
        self._objective_keys_apply()
        preference = self.dpo or self.kto
        if (
            preference
            and preference.reference == "base"
            and self.model.adapter
            and self.lora.method == "full"
        ):
            raise ValueError(
                f"{self.train.objective}.reference base with lora.method full and model.adapter would need the base as "
                "a second full copy; use reference: start (the run's weights, frozen), or continue a LoRA run"
            )
        if self.kto is not None and self.kto.loss_type == "kto" and self.train.batch_size < 2:
            raise ValueError(
                "kto.loss_type kto estimates its KL baseline by scoring each prompt with another answer of the same "
                "batch: train.batch_size must be 2 or more (or use kto.loss_type: apo_zero_unpaired)"
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
    if recipe.train.eval_generate_steps:
        raise ValueError(
            "train.eval_generate_steps cannot run under strategy fsdp (generation would need every rank); drop it, "
            "or use strategy: ddp"
        )
    if recipe.train.eval_generate:
        raise ValueError(
            "train.eval_generate cannot run under strategy fsdp (generation would need every rank); set it to "
            "false and run `vlmtune eval RUN_DIR` on the finished run"
        )


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
