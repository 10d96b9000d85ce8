"""The recipe schema: one strict pydantic model per section, and load_recipe().

Every default lives here, in this package, nowhere else. Unknown keys are rejected, every problem is
reported at once with its key path, its YAML line and a did-you-mean, and the validated recipe is frozen.

- `sections`: the sections every objective reads (model, quantization, lora, data, train, output).
- `objectives`: the dpo, kto and grpo sections, grpo's rewards, the keys only some objectives read.
- `schema`: the whole `Recipe`, the checks across its sections, its JSON schema.
- `loading`: `load_recipe()` and `parse_recipe()`: YAML, `--set` overrides, validation, paths.
- `messages`: validation errors as lines a user can act on.
- `sanity`: `recipe_warnings()`, values that validate but are almost surely a mistake (a learning rate of 1e9).

Import from here (`from vlmtune.recipe import Recipe, load_recipe`), not from the modules.
"""

from vlmtune.recipe.loading import apply_overrides, load_recipe, parse_recipe
from vlmtune.recipe.messages import ALIASES
from vlmtune.recipe.objectives import (
    MODULE_FUNCTION,
    OBJECTIVE_ONLY,
    RESERVED_REWARD_NAMES,
    REWARD_KINDS,
    REWARD_NAME,
    ContainsReward,
    DpoSection,
    ExactMatchReward,
    FunctionReward,
    GrpoSection,
    KtoSection,
    LengthReward,
    NumberReward,
    RegexReward,
    Reward,
    RewardSpec,
)
from vlmtune.recipe.sanity import recipe_warnings
from vlmtune.recipe.schema import Recipe, recipe_json_schema, section_types
from vlmtune.recipe.sections import (
    DataSection,
    DistributedSection,
    LoraSection,
    ModelSection,
    OutputSection,
    QuantizationSection,
    Section,
    Strict,
    TrainSection,
)

__all__ = [
    "recipe_warnings",
    "ALIASES",
    "MODULE_FUNCTION",
    "OBJECTIVE_ONLY",
    "RESERVED_REWARD_NAMES",
    "REWARD_KINDS",
    "REWARD_NAME",
    "ContainsReward",
    "DataSection",
    "DistributedSection",
    "DpoSection",
    "ExactMatchReward",
    "FunctionReward",
    "GrpoSection",
    "KtoSection",
    "LengthReward",
    "LoraSection",
    "ModelSection",
    "NumberReward",
    "OutputSection",
    "QuantizationSection",
    "Recipe",
    "RegexReward",
    "Reward",
    "RewardSpec",
    "Section",
    "Strict",
    "TrainSection",
    "apply_overrides",
    "load_recipe",
    "parse_recipe",
    "recipe_json_schema",
    "section_types",
]
