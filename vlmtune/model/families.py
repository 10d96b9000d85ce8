"""One declarative record per VLM architecture: a flat table of data, and the lookups over it.

Stages never branch on a model name: they read these records. Adding a family means adding a
record here (naming its image-token functions in vlmtune.model.image_tokens and its tiny builder) and
the builder in ``vlmtune.model.tiny``; docs/adding-a-family.md walks through it.

Module prefixes are the in-memory names of transformers 5 (``model.visual``, not ``visual``):
bitsandbytes' skip list and peft's target regex are anchored on them, because bare suffixes
collide (Qwen2.5-VL's vision MLP and Pixtral's vision attention reuse the language names).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vlmtune.errors import ModelError
from vlmtune.model import image_tokens as it
from vlmtune.model import shims
from vlmtune.model.image_tokens import ImageSettings, TokensPerImage

LANGUAGE_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LANGUAGE_MLP = ("gate_proj", "up_proj", "down_proj")
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
CLIP_MLP = ("fc1", "fc2")

COMPONENTS = ("vision", "projector", "language", "lm_head", "other")

# A family whose packing is not proven says why in its record; this is the default reason.
PACKING_UNPROVEN = "no test proves that a packed row of it trains like its samples one by one"
# A family without a GGUF export says why in its record; this is the default reason.
GGUF_UNPROVEN = (
    "no vlmtune test proves llama.cpp's converter (language GGUF + mmproj) and its answers for this family"
)
# Families whose transformers architecture llama.cpp's converter does not list (llama-cpp-python 0.3.36's copy).
NO_GGUF_CONVERTER = "llama.cpp's converter has no language + mmproj conversion for this architecture"
# Families llama.cpp's converter lists but vlmtune cannot serve yet, each with what stops it (found on the
# tiny models with llama-cpp-python 0.3.36's converter; docs/export.md has the details).
GGUF_GEMMA3_REFUSED = (
    "llama.cpp's converter cannot map the vision tower of a checkpoint saved by transformers 5 "
    "(vision_tower.embeddings.*, no vision_model level), and with the names mapped back llama.cpp still "
    "answered otherwise than transformers on resized images and on two-image prompts"
)
GGUF_IDEFICS3_REFUSED = (
    "llama.cpp's converter takes the language model's class from text_config.architectures, which a "
    "transformers 5 checkpoint lacks; with it set, llama.cpp answered 3 of 8 tiny-model eval images as "
    "transformers (its image tiling and resizing differ)"
)
GGUF_LLAVA_REFUSED = (
    "llama.cpp's convert_hf_to_gguf.py converts a Llava checkpoint only with a Pixtral vision tower; a CLIP "
    "tower needs llama.cpp's legacy scripts (tools/mtmd/legacy-models), which vlmtune does not run"
)
GGUF_PIXTRAL_REFUSED = (
    "llama.cpp's mmproj conversion drops every language_model.* tensor before taking the [IMG_BREAK] "
    "embedding from language_model.model.embed_tokens, so the mmproj of a transformers checkpoint lacks "
    "v.token_embd.img_break and llama.cpp refuses to load it"
)
GGUF_QWEN3_5_UNTESTABLE = (
    "llama.cpp's converter requires the multi-token-prediction layers of the released checkpoints "
    "(it asserts mtp_num_hidden_layers != 0), which vlmtune's tiny model lacks, so no test converted one"
)
GGUF_QWEN3_VL_MOE_REFUSED = (
    "llama.cpp refuses the language GGUF its converter writes for the tiny model (blk.0.ffn_gate_exps.weight: "
    "wrong shape, the fused expert tensors laid out otherwise than it expects)"
)
# The Qwen-VL chat template (ChatML with its default system turn) in Ollama's Go-template syntax; Ollama
# puts the images in itself.
QWEN_OLLAMA_TEMPLATE = (
    '{{- if not (and .Messages (eq (index .Messages 0).Role "system")) }}<|im_start|>system\n'
    "You are a helpful assistant.<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)

# Qwen3-VL's ChatML has no default system turn.
QWEN3_OLLAMA_TEMPLATE = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"


@dataclass(frozen=True)
class Packing:
    """How a family's samples share one packed row (vlmtune.data.packing; docs/performance.md).

    Every packing family is proven by tests/test_packing.py: a packed row gives the loss and the
    gradients of its samples one by one.
    """

    # Text positions restart at 0 for each sample, which is what transformers reads to keep each
    # sample's attention to itself. ``rope_index``: the attribute path (from the model under the
    # LM head) of the function that gives a sample its multimodal RoPE rows (Qwen-VL's
    # get_rope_index), put under the restarting text row; None: 1-D positions.
    rope_index: str | None = None
    # The axis of the pixel inputs along which a sample's images are listed (Idefics3 has a batch
    # axis before its images); images of different sizes are zero-padded as the processor pads a batch.
    image_axis: int = 0


@dataclass(frozen=True)
class Family:
    """Everything a stage needs to know about one architecture."""

    name: str  # the id users write: tiny:<name>, `vlmtune tiny <name>`
    title: str
    tiny_builder: str  # "module:function" that fabricates a tiny random checkpoint (vlmtune.model.tiny)
    model_types: tuple[str, ...]  # config.model_type values this record claims
    vision_prefix: str
    projector_prefixes: tuple[str, ...]
    language_prefix: str
    image_token: str  # the placeholder the processor expands into image tokens
    # Image feature tokens per image: tokens_per_image(width, height, image_settings(processor)).
    # It counts image_feature_token occurrences (structural tokens around them are not counted).
    tokens_per_image: TokensPerImage
    # What else decides the text an image expands to, when its token count does not (Pixtral's rows
    # and columns, Idefics3's tiles): (width, height, settings) -> a hashable key. None: the count.
    image_layout: Callable[[int, int, ImageSettings], Any] | None = None
    vision_attention: tuple[str, ...] = CLIP_ATTENTION
    vision_mlp: tuple[str, ...] = CLIP_MLP
    language_attention: tuple[str, ...] = LANGUAGE_ATTENTION
    language_mlp: tuple[str, ...] = LANGUAGE_MLP
    lm_head: str = "lm_head"
    # config.vision_config.model_type values that select this record over a plain model_type
    # match (Pixtral-12B checkpoints say model_type "llava").
    vision_model_types: tuple[str, ...] = ()
    structural_tokens: tuple[str, ...] = ()  # vision tokens besides image_token, masked from the loss
    # The token repeated once per image feature where it differs from the placeholder (Gemma 3
    # writes <start_of_image> and gets <image_soft_token> x 256).
    feature_token: str | None = None
    extra_inputs: tuple[str, ...] = ()  # processor outputs the model needs besides ids/mask/pixels
    # token_type_ids mark the causal answer (1) after a bidirectional prefix (0), PaliGemma's
    # prefix-LM: the collator sets them from the labels, since a chat template has no "suffix".
    token_types_from_labels: bool = False
    # The chat template used where the checkpoint ships none (PaliGemma); documented in docs/families.md.
    chat_template: str | None = None
    # Processor class to build without a video processor when AutoProcessor needs torchvision.
    processor_class: str | None = None
    processor_needs_video: bool = False  # its __init__ requires a (torchvision-only) video processor
    prepare_processor_import: Callable[[], None] | None = None  # shims run before importing the class
    # How the recipe's pixel budget is written into the image processor (None: fixed resolution).
    pixel_budget: Callable[[Any, int], None] | None = None
    # The processor (or, for Qwen, its image processor alone) -> the settings tokens_per_image reads.
    image_settings: Callable[[Any], ImageSettings] = field(default=lambda processor: ImageSettings())
    # The module lists that hold the transformer blocks, vision tower first: FSDP shards each block
    # as one unit. Lists, not class names: a family's checkpoints differ in backbone (Llava has
    # Llama, Mistral or Qwen2 blocks, CLIP or SigLIP towers), so the classes are read from the model.
    block_lists: tuple[str, ...] = ()
    # train.packing: how samples share a row, or None with ``packing_refused`` saying why not.
    packing: Packing | None = None
    packing_refused: str = PACKING_UNPROVEN

    # What the language model computes, for vlmtune.kernels (train.kernels): its norm (rmsnorm, or
    # gemma_rmsnorm: x_hat * (1 + w)), its gated MLP activation (swiglu: silu; geglu: gelu tanh) and its
    # rotary layout (default; mrope: Qwen2/2.5-VL's t|h|w frequency sections; mrope_interleaved: Qwen3-VL's).
    # The patch checks each against the loaded modules and leaves a module alone where they disagree.
    # None: no kernel of that kind for this family (not proven by tests/test_kernels_patching.py).
    norm: str | None = "rmsnorm"
    mlp_activation: str | None = "swiglu"
    rope: str | None = "default"

    # --- hybrid attention, mixture of experts, objectives (issue 25; one block, for easy merges) ---
    # Language Linears kept 16-bit under 4-bit/8-bit loading, as module-path endings (whole segments):
    # gates whose outputs are a few scalars per head, which 4-bit would disturb most for the least
    # memory (Qwen3.5's Gated DeltaNet in_proj_a / in_proj_b, a shared expert's gate).
    language_keep_16bit: tuple[str, ...] = ()
    # Fused expert tensors (3-D nn.Parameters, no nn.Linear) as parameter-name endings under the
    # language prefix: bitsandbytes leaves them 16-bit, LoRA reaches them only through peft's
    # target_parameters. Empty: a dense model.
    expert_parameters: tuple[str, ...] = ()
    # The config keys (of the text config) holding the number of routed experts and the experts each
    # token uses: estimate-memory's active parameters.
    expert_count_keys: tuple[str, str] = ("num_experts", "num_experts_per_tok")
    # The router's module-path ending. Never quantized: it is no nn.Linear in these families, and
    # keep_16bit() lists it anyway.
    router: str | None = None
    # Why LoRA cannot reach the experts (None: it can, through target_parameters with the MLP toggle).
    expert_lora_refusal: str | None = None
    # Objectives this family cannot be trained with: (objective, reason) pairs; the objective's stage
    # refuses them with the reason before any weight loads.
    refused_objectives: tuple[tuple[str, str], ...] = ()
    # (config dict, max_image_pixels) -> ImageSettings, where a config alone (estimate-memory on a hub id)
    # needs the family's own reading (Gemma 4: soft tokens per image live in the processor, not the config).
    config_image_settings: Callable[[dict, int | None], ImageSettings] | None = None
    # Does the model's forward multiply its logits by the text config's logit_scale (Cohere's language
    # models)? Aya Vision's wrapper keeps a Cohere2 config but projects with its own lm_head, unscaled:
    # vlmtune's loss must compute what the model computes.
    applies_logit_scale: bool = True
    # The vision tower takes pixel_values in whatever dtype they come (Llama 4: transformers' processor gives
    # bfloat16, the PIL one float32): the load stage casts them to the tower's dtype at its input.
    cast_pixel_values: bool = False

    # --- export to serving (issue 28; vlmtune.after.export_gguf, export_vllm) ---
    # llama.cpp's name for the BPE pre-tokenizer of the family's tokenizer ("qwen2"): set only where
    # llama.cpp's converter turns the family into a language GGUF plus an mmproj and a vlmtune test
    # proves it (tests/test_export_serving.py); None: `export --format gguf` refuses with gguf_refused.
    gguf_pre_tokenizer: str | None = None
    gguf_refused: str = GGUF_UNPROVEN
    # Config values (dotted paths into config.json) that llama.cpp assumes instead of reading: the converter
    # does not carry them into the GGUF, so a model with another value would be served with other
    # arithmetic. `export --format gguf` refuses such a model before converting (export_gguf.check_config).
    gguf_assumed_config: tuple[tuple[str, object], ...] = ()
    # The chat template in Ollama's Go-template syntax, for the Modelfile beside the GGUF files.
    ollama_template: str | None = None
    # On vLLM's tower/connector-LoRA list (`--enable-tower-connector-lora`; vllm #26674 and its follow-ups).
    # False: vLLM loads LoRA on the language model only and skips the rest without a word, so a vision
    # LoRA ships merged into the tower instead.
    vllm_tower_lora: bool = False

    def component_of(self, module_name: str) -> str:
        """vision | projector | language | lm_head | other, by anchored prefix."""
        if module_name == self.lm_head:
            return "lm_head"
        if any(under(module_name, p) for p in self.projector_prefixes):
            return "projector"
        if under(module_name, self.vision_prefix):
            return "vision"
        if under(module_name, self.language_prefix):
            return "language"
        return "other"

    def keep_16bit(self) -> list[str]:
        """What bitsandbytes must leave alone (the default list is replaced): full module prefixes of
        the towers kept 16-bit, then anchored regexes of the language Linears kept 16-bit."""
        language = [
            f"{re.escape(self.language_prefix)}\\.(?:.*\\.)?{re.escape(ending)}"
            for ending in (*self.language_keep_16bit, *((self.router,) if self.router else ()))
        ]
        return [self.vision_prefix, *self.projector_prefixes, self.lm_head, *language]

    @property
    def moe(self) -> bool:
        return bool(self.expert_parameters)

    def is_expert_parameter(self, param_name: str) -> bool:
        return under(param_name, self.language_prefix) and any(
            ends_with(param_name, ending) for ending in self.expert_parameters
        )

    def refusal(self, objective: str) -> str | None:
        """Why this family cannot be trained with ``objective`` (None: it can)."""
        return dict(self.refused_objectives).get(objective)

    @property
    def packing_note(self) -> str:
        """One line for inspect / validate: can this family's samples be packed (train.packing)?"""
        if self.packing is None:
            return f"train.packing: refused for {self.title}: {self.packing_refused}"
        how = "multimodal RoPE per sample" if self.packing.rope_index else "positions restart per sample"
        return f"train.packing: supported for {self.title} ({how}; proven by tests/test_packing.py)"

    @property
    def image_feature_token(self) -> str:
        return self.feature_token or self.image_token

    @property
    def vision_tokens(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.image_token, self.image_feature_token, *self.structural_tokens)))


def under(name: str, prefix: str) -> bool:
    """Is module ``name`` the module ``prefix`` or inside it (a whole-segment prefix, never a substring)?"""
    return name == prefix or name.startswith(prefix + ".")


def ends_with(name: str, suffix: str) -> bool:
    """Does module ``name`` end with the module path ``suffix`` (whole segments: attn.proj, not c_proj)?"""
    return name == suffix or name.endswith("." + suffix)


def skipped_by(name: str, patterns: Iterable[str]) -> bool:
    """Does bitsandbytes leave module ``name`` alone under the skip list ``patterns``?

    transformers 5's rule (quantizers_utils.should_convert_module): a pattern matches from the start
    up to a module boundary, as a prefix or as a regex, or it is a suffix of the name. The memory
    model reads it here so the estimate quantizes exactly what loading does.
    """
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in patterns)


# --- the records --------------------------------------------------------------------------------

_QWEN_COMMON = dict(
    projector_prefixes=("model.visual.merger",),
    vision_prefix="model.visual",
    language_prefix="model.language_model",
    image_token="<|image_pad|>",
    structural_tokens=("<|vision_start|>", "<|vision_end|>", "<|video_pad|>"),
    tokens_per_image=it.qwen_tokens,
    pixel_budget=it.qwen_budget,
    image_settings=it.qwen_settings,
    block_lists=("model.visual.blocks", "model.language_model.layers"),
    packing=Packing(rope_index="model.get_rope_index"),  # M-RoPE rows per sample
)

QWEN2_VL = Family(
    name="qwen2_vl",
    tiny_builder="vlmtune.model.tiny.qwen:build_qwen2_vl",
    title="Qwen2-VL",
    model_types=("qwen2_vl",),
    vision_attention=("attn.qkv", "attn.proj"),
    vision_mlp=("mlp.fc1", "mlp.fc2"),
    extra_inputs=("image_grid_thw", "mm_token_type_ids"),  # M-RoPE: forward raises without the latter
    processor_class="Qwen2VLProcessor",
    processor_needs_video=True,
    rope="mrope",
    gguf_pre_tokenizer="qwen2",
    ollama_template=QWEN_OLLAMA_TEMPLATE,
    vllm_tower_lora=True,
    **_QWEN_COMMON,
)

QWEN2_5_VL = Family(
    name="qwen2_5_vl",
    tiny_builder="vlmtune.model.tiny.qwen:build_qwen2_5_vl",
    title="Qwen2.5-VL",
    model_types=("qwen2_5_vl",),
    vision_attention=("attn.qkv", "attn.proj"),
    vision_mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    extra_inputs=("image_grid_thw", "mm_token_type_ids"),
    processor_class="Qwen2_5_VLProcessor",
    processor_needs_video=True,
    rope="mrope",
    gguf_pre_tokenizer="qwen2",
    # llama.cpp's Qwen2.5-VL mmproj windows its vision attention at 112 pixels whatever the config says
    # (clip.cpp: attn_window_size unset for this projector, so its default 112, the released checkpoints'):
    # with the tiny model's 56 the windowed blocks see a whole 112-pixel image where transformers sees
    # four windows.
    gguf_assumed_config=(("vision_config.window_size", 112),),
    ollama_template=QWEN_OLLAMA_TEMPLATE,
    vllm_tower_lora=True,
    **_QWEN_COMMON,
)

QWEN3_VL = Family(
    name="qwen3_vl",
    tiny_builder="vlmtune.model.tiny.qwen3:build_qwen3_vl",
    title="Qwen3-VL",
    model_types=("qwen3_vl",),
    vision_attention=("attn.qkv", "attn.proj"),
    vision_mlp=("mlp.linear_fc1", "mlp.linear_fc2"),
    extra_inputs=("image_grid_thw", "mm_token_type_ids"),
    processor_class="Qwen3VLProcessor",
    processor_needs_video=True,
    rope="mrope_interleaved",
    gguf_pre_tokenizer="qwen2",
    ollama_template=QWEN3_OLLAMA_TEMPLATE,
    **{**_QWEN_COMMON, "projector_prefixes": ("model.visual.merger", "model.visual.deepstack_merger_list")},
)

# Gated DeltaNet (Qwen3.5's linear-attention layers): LoRA and 4-bit reach the three wide
# projections; in_proj_a / in_proj_b (hidden -> one scalar per value head: the decay and the write
# strength) stay 16-bit and untrained, as do the conv1d, A_log and dt_bias (no Linears).
GATED_DELTANET = ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj")
GATED_DELTANET_16BIT = ("linear_attn.in_proj_a", "linear_attn.in_proj_b")
# Fused experts of the Qwen MoE lineage: (experts, 2 * moe_intermediate, hidden) and (experts,
# hidden, moe_intermediate) tensors, one pair per layer; the router is mlp.gate (no Linear).
QWEN_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

_QWEN3_LINEAGE = dict(
    vision_attention=("attn.qkv", "attn.proj"),
    vision_mlp=("mlp.linear_fc1", "mlp.linear_fc2"),
    extra_inputs=("image_grid_thw", "mm_token_type_ids"),
    processor_class="Qwen3VLProcessor",
    processor_needs_video=True,
)

QWEN3_VL_MOE = Family(
    name="qwen3_vl_moe",
    tiny_builder="vlmtune.model.tiny.qwen3:build_qwen3_vl_moe",
    title="Qwen3-VL-MoE",
    gguf_refused=GGUF_QWEN3_VL_MOE_REFUSED,
    # Kernels not proven for it yet (tests/test_kernels_patching.py): its experts are fused 3-D tensors,
    # no gated MLP module
    mlp_activation=None,
    model_types=("qwen3_vl_moe",),
    expert_parameters=QWEN_EXPERTS,
    router="mlp.gate",
    **_QWEN3_LINEAGE,
    **{**_QWEN_COMMON, "projector_prefixes": ("model.visual.merger", "model.visual.deepstack_merger_list")},
)

DELTANET_PACKING = (
    "its Gated DeltaNet layers carry a recurrent state along the whole row, across the boundaries of packed "
    "samples (tried: a packed row's loss differed from its samples' by 9e-4 relative)"
)

QWEN3_5 = Family(
    name="qwen3_5",
    tiny_builder="vlmtune.model.tiny.qwen3:build_qwen3_5",
    title="Qwen3.5",
    gguf_refused=GGUF_QWEN3_5_UNTESTABLE,
    # Kernels not proven for it yet (tests/test_kernels_patching.py): its norms are not the plain RMSNorm the
    # kernel computes, and its partial rotary (Gated DeltaNet beside attention) gave NaN with the rope kernel
    norm=None,
    rope=None,
    model_types=("qwen3_5",),
    language_attention=(*LANGUAGE_ATTENTION, *GATED_DELTANET),  # output projections last in each kind
    language_keep_16bit=GATED_DELTANET_16BIT,
    **_QWEN3_LINEAGE,
    **{**_QWEN_COMMON, "packing": None},
    packing_refused=DELTANET_PACKING,
)

QWEN3_5_MOE = Family(
    name="qwen3_5_moe",
    tiny_builder="vlmtune.model.tiny.qwen3:build_qwen3_5_moe",
    title="Qwen3.5-MoE",
    # Kernels not proven for it yet (tests/test_kernels_patching.py): its norms are not the plain RMSNorm the
    # kernel computes, and its partial rotary (Gated DeltaNet beside attention) gave NaN with the rope kernel
    norm=None,
    rope=None,
    model_types=("qwen3_5_moe",),
    language_attention=(*LANGUAGE_ATTENTION, *GATED_DELTANET),
    # language_mlp's gate/up/down_proj are the shared expert's Linears (mlp.shared_expert.*): 4-bit, LoRA
    language_keep_16bit=(*GATED_DELTANET_16BIT, "mlp.shared_expert_gate"),
    expert_parameters=QWEN_EXPERTS,
    router="mlp.gate",
    **_QWEN3_LINEAGE,
    **{**_QWEN_COMMON, "packing": None},
    packing_refused=DELTANET_PACKING,
)

GEMMA4 = Family(
    name="gemma4",
    tiny_builder="vlmtune.model.tiny.gemma4:build_gemma4",
    title="Gemma 4",
    # Kernels not proven for it yet (tests/test_kernels_patching.py): its rotary embedding takes arguments
    # the kernel does not
    rope=None,
    mlp_activation="geglu",
    model_types=("gemma4",),
    vision_prefix="model.vision_tower",
    projector_prefixes=("model.embed_vision",),
    language_prefix="model.language_model",
    image_token="<|image|>",
    structural_tokens=("<|image>", "<image|>"),
    # Gemma 4's vision Linears sit inside clippable wrappers: self_attn.q_proj.linear, mlp.gate_proj.linear
    vision_attention=tuple(f"self_attn.{n}.linear" for n in LANGUAGE_ATTENTION),
    vision_mlp=tuple(f"mlp.{n}.linear" for n in LANGUAGE_MLP),
    extra_inputs=("image_position_ids", "mm_token_type_ids"),
    # The 26B-A4B checkpoint adds, beside each layer's dense MLP, 128 fused experts (8 per token) and a
    # router whose projection IS a Linear (router.proj): kept 16-bit. Dense checkpoints have neither.
    expert_parameters=("experts.gate_up_proj", "experts.down_proj"),
    expert_count_keys=("num_experts", "top_k_experts"),
    router="router.proj",
    processor_class="Gemma4Processor",
    processor_needs_video=True,
    tokens_per_image=it.gemma4_tokens,
    pixel_budget=it.gemma4_budget,
    image_settings=it.gemma4_settings,
    config_image_settings=it.gemma4_settings_from_config,
    block_lists=("model.vision_tower.encoder.layers", "model.language_model.layers"),
    packing=Packing(),
)

_GLM_V = dict(
    vision_prefix="model.visual",
    projector_prefixes=("model.visual.merger",),
    language_prefix="model.language_model",
    image_token="<|image|>",
    structural_tokens=("<|begin_of_image|>", "<|end_of_image|>"),
    vision_attention=("attn.qkv", "attn.proj"),
    vision_mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    language_mlp=("mlp.gate_up_proj", "mlp.down_proj"),  # GLM-4 fuses gate and up
    extra_inputs=("image_grid_thw", "mm_token_type_ids"),
    processor_needs_video=True,
    tokens_per_image=it.glm4v_tokens,
    pixel_budget=it.glm4v_budget,
    image_settings=it.qwen_settings,
    block_lists=("model.visual.blocks", "model.language_model.layers"),
    packing=Packing(rope_index="model.get_rope_index"),  # its 3-D rope rows per sample, as Qwen's
)

GLM4V = Family(
    name="glm4v",
    tiny_builder="vlmtune.model.tiny.glm:build_glm4v",
    title="GLM-4.1V",
    # Kernels not proven for it yet (tests/test_kernels_patching.py): GLM fuses gate and up; its rotary is
    # not rotate-half
    mlp_activation=None,
    rope=None,
    model_types=("glm4v",),
    processor_class="Glm4vProcessor",
    **_GLM_V,
)

GLM46V = Family(
    name="glm46v",
    gguf_refused=NO_GGUF_CONVERTER,
    tiny_builder="vlmtune.model.tiny.glm:build_glm46v",
    title="GLM-4.6V",
    # Kernels not proven for it yet (tests/test_kernels_patching.py): GLM fuses gate and up; its rotary is
    # not rotate-half
    mlp_activation=None,
    rope=None,
    model_types=("glm46v",),
    processor_class="Glm46VProcessor",
    **_GLM_V,
)

_LLAVA_LAYOUT = dict(
    vision_prefix="model.vision_tower",
    projector_prefixes=("model.multi_modal_projector",),
    language_prefix="model.language_model",
    block_lists=("model.vision_tower.encoder.layers", "model.language_model.layers"),
    packing=Packing(),
)

LLAVA = Family(
    name="llava",
    tiny_builder="vlmtune.model.tiny.llava:build_llava",
    title="Llava-1.5",
    model_types=("llava",),
    gguf_refused=GGUF_LLAVA_REFUSED,
    image_token="<image>",
    tokens_per_image=it.fixed_tokens,
    image_settings=it.llava_settings,
    **_LLAVA_LAYOUT,
)

LLAVA_NEXT = Family(
    name="llava_next",
    gguf_refused=NO_GGUF_CONVERTER,
    tiny_builder="vlmtune.model.tiny.llava:build_llava_next",
    title="LLaVA-NeXT",
    model_types=("llava_next",),
    image_token="<image>",
    extra_inputs=("image_sizes",),
    tokens_per_image=it.llava_next_tokens,
    image_settings=it.llava_next_settings,
    **_LLAVA_LAYOUT,
)

LLAVA_ONEVISION = Family(
    name="llava_onevision",
    gguf_refused=NO_GGUF_CONVERTER,
    tiny_builder="vlmtune.model.tiny.llava:build_llava_onevision",
    title="LLaVA-OneVision",
    model_types=("llava_onevision",),
    image_token="<image>",
    structural_tokens=("<video>",),
    extra_inputs=("image_sizes", "batch_num_images"),
    processor_class="LlavaOnevisionProcessor",
    processor_needs_video=True,
    tokens_per_image=it.llava_onevision_tokens,
    image_settings=it.llava_onevision_settings,
    # its forward matches image features to tokens per batch row (batch_num_images): a packed row of
    # several samples' images fails that match
    **{**_LLAVA_LAYOUT, "packing": None},
    packing_refused="its anyres image features are matched to image tokens per batch row, which packing breaks",
)

_PIXTRAL_COMMON = dict(
    image_token="[IMG]",
    structural_tokens=("[IMG_BREAK]", "[IMG_END]"),
    # Pixtral's vision tower uses the language model's Linear names; the anchored prefix keeps
    # the two apart.
    vision_attention=("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),
    vision_mlp=("feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj"),
    extra_inputs=("image_sizes",),
    processor_class="PixtralProcessor",
    prepare_processor_import=shims.pixtral_processor_without_torchvision,
    tokens_per_image=it.pixtral_tokens,
    image_layout=it.pixtral_grid,
    pixel_budget=it.pixtral_budget,
    image_settings=it.pixtral_settings,
    **{
        **_LLAVA_LAYOUT,
        "block_lists": ("model.vision_tower.transformer.layers", "model.language_model.layers"),
    },
)

PIXTRAL = Family(
    name="pixtral",
    tiny_builder="vlmtune.model.tiny.pixtral:build_pixtral",
    title="Pixtral",
    model_types=("llava",),
    vision_model_types=("pixtral",),
    gguf_refused=GGUF_PIXTRAL_REFUSED,
    **_PIXTRAL_COMMON,
)

MISTRAL3 = Family(
    name="mistral3",
    tiny_builder="vlmtune.model.tiny.pixtral:build_mistral3",
    title="Mistral3",
    model_types=("mistral3",),
    gguf_refused=GGUF_PIXTRAL_REFUSED,
    **_PIXTRAL_COMMON,
)

GEMMA3 = Family(
    name="gemma3",
    tiny_builder="vlmtune.model.tiny.gemma:build_gemma3",
    title="Gemma 3",
    model_types=("gemma3",),
    gguf_refused=GGUF_GEMMA3_REFUSED,
    image_token="<start_of_image>",
    feature_token="<image_soft_token>",
    structural_tokens=("<end_of_image>",),
    extra_inputs=("token_type_ids",),
    tokens_per_image=it.fixed_tokens,
    image_settings=it.seq_length_settings,
    norm="gemma_rmsnorm",
    mlp_activation="geglu",
    **{**_LLAVA_LAYOUT, "packing": None},
    packing_refused="its bidirectional attention inside each image is not kept apart per packed sample "
    "(tried: a packed row's loss differed from its samples' by 1e-3 relative)",
)

MLLAMA = Family(
    name="mllama",
    gguf_refused=NO_GGUF_CONVERTER,
    tiny_builder="vlmtune.model.tiny.mllama:build_mllama",
    title="Llama 3.2 Vision",
    model_types=("mllama",),
    vision_prefix="model.vision_model",
    projector_prefixes=("model.multi_modal_projector",),
    language_prefix="model.language_model",
    image_token="<|image|>",
    vision_attention=("q_proj", "k_proj", "v_proj", "o_proj"),
    # language_attention's names also cover the cross-attention layers (cross_attn.q_proj ...)
    extra_inputs=("cross_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask"),
    tokens_per_image=it.one_token,
    image_settings=it.mllama_settings,
    block_lists=(
        "model.vision_model.transformer.layers",
        "model.vision_model.global_transformer.layers",
        "model.language_model.layers",  # self-attention and cross-attention decoder layers
    ),
    packing_refused="its text attends to the images through cross-attention layers, whose mask is not built "
    "per packed sample, so a sample would see the other samples' images",
    refused_objectives=(
        (
            "kto",
            "its cross_attention_mask runs over the tokens, and TRL's KTOTrainer scores the KL sequences (each "
            "prompt with another sample's answer, of other lengths) with the training sequences' mask",
        ),
    ),
)

_IDEFICS3_COMMON = dict(
    vision_prefix="model.vision_model",
    projector_prefixes=("model.connector",),
    language_prefix="model.text_model",
    image_token="<image>",
    structural_tokens=(
        "<fake_token_around_image>",
        "<global-img>",
        *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
    ),
    extra_inputs=("pixel_attention_mask",),
    tokens_per_image=it.idefics3_tokens,
    image_layout=it.idefics3_tiles,
    pixel_budget=it.idefics3_budget,
    image_settings=it.idefics3_settings,
    block_lists=("model.vision_model.encoder.layers", "model.text_model.layers"),
    packing=Packing(image_axis=1),  # pixel_values: (batch, images, channels, height, width)
)

IDEFICS3 = Family(
    name="idefics3",
    tiny_builder="vlmtune.model.tiny.idefics:build_idefics3",
    title="Idefics3",
    model_types=("idefics3",),
    gguf_refused=GGUF_IDEFICS3_REFUSED,
    **_IDEFICS3_COMMON,
)

SMOLVLM = Family(
    name="smolvlm",
    tiny_builder="vlmtune.model.tiny.idefics:build_smolvlm",
    title="SmolVLM",
    model_types=("smolvlm",),
    gguf_refused=GGUF_IDEFICS3_REFUSED,
    # SmolVLMProcessor needs num2words and a (torchvision-only) video processor; its image prompts
    # are Idefics3's, character for character, so Idefics3Processor serves SmolVLM checkpoints.
    processor_class="Idefics3Processor",
    **_IDEFICS3_COMMON,
)

# PaliGemma has no chat template upstream: it is trained on "<image>...<bos>prefix\n" + answer +
# <eos>, its processor adding <bos> after the last image and "\n" at the end. This template renders
# a conversation in that shape (images and user text, "\n", the answer, <eos>), so each turn's
# prompt is a prefix of the whole conversation, which the collator needs to find the answers.
PALIGEMMA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if message['role'] != 'assistant' and (part['type'] == 'image' or 'image' in part "
    "or 'image_url' in part) -%}{{ '<image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- else -%}{{ '\n' }}{%- endif -%}"
    "{%- endfor -%}"
)

PALIGEMMA = Family(
    name="paligemma",
    gguf_refused=NO_GGUF_CONVERTER,
    tiny_builder="vlmtune.model.tiny.gemma:build_paligemma",
    title="PaliGemma",
    model_types=("paligemma",),
    image_token="<image>",
    extra_inputs=("token_type_ids",),
    token_types_from_labels=True,
    chat_template=PALIGEMMA_CHAT_TEMPLATE,
    norm="gemma_rmsnorm",
    mlp_activation="geglu",
    tokens_per_image=it.fixed_tokens,
    image_settings=it.seq_length_settings,
    **{**_LLAVA_LAYOUT, "packing": None},
    packing_refused="its prefix-LM attention (token_type_ids: the prompt attends both ways) is not kept "
    "apart per packed sample",
)

INTERNVL = Family(
    name="internvl",
    gguf_refused=NO_GGUF_CONVERTER,
    tiny_builder="vlmtune.model.tiny.internvl:build_internvl",
    title="InternVL",
    model_types=("internvl",),
    image_token="<IMG_CONTEXT>",
    structural_tokens=("<img>", "</img>", "<video>"),
    vision_attention=(
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.projection_layer",
    ),
    vision_mlp=("mlp.fc1", "mlp.fc2"),
    processor_class="InternVLProcessor",
    processor_needs_video=True,
    tokens_per_image=it.internvl_tokens,
    pixel_budget=it.internvl_budget,
    image_settings=it.internvl_settings,
    **{**_LLAVA_LAYOUT, "block_lists": ("model.vision_tower.encoder.layer", "model.language_model.layers")},
)

AYA_VISION = Family(
    name="aya_vision",
    tiny_builder="vlmtune.model.tiny.aya:build_aya_vision",
    title="Aya Vision",
    # Kernels not proven for it yet (tests/test_kernels_patching.py): Cohere2 normalises with LayerNorm and
    # rotates interleaved pairs, neither of which the kernels compute
    norm=None,
    mlp_activation=None,
    rope=None,
    model_types=("aya_vision",),
    image_token="<image>",
    feature_token="<|IMG_PATCH|>",
    # TILE_1, TILE_2 ... : the tile word is a token, its number plain text (in the prompt, never trained)
    structural_tokens=("<|START_OF_IMG|>", "<|END_OF_IMG|>", "TILE", "TILE_GLOBAL", "<|IMG_LINE_BREAK|>"),
    tokens_per_image=it.internvl_tokens,  # GotOcr2's tiles, as InternVL's
    pixel_budget=it.internvl_budget,
    image_settings=it.aya_vision_settings,
    config_image_settings=it.aya_vision_settings_from_config,
    applies_logit_scale=False,
    **_LLAVA_LAYOUT,
)

MINICPMV4_6 = Family(
    name="minicpmv4_6",
    tiny_builder="vlmtune.model.tiny.minicpm:build_minicpmv4_6",
    title="MiniCPM-V 4.6",
    # Kernels not proven for it yet (tests/test_kernels_patching.py): its Qwen3.5 decoder's, as for Qwen3.5
    norm=None,
    rope=None,
    model_types=("minicpmv4_6",),
    vision_prefix="model.vision_tower",  # the window-attention merger (vit_merger) inside it included
    projector_prefixes=("model.merger",),
    language_prefix="model.language_model",
    image_token="<|image_pad|>",
    # <image_id>i</image_id> (its digits plain text), the whole image's and each slice's markers
    structural_tokens=("<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>"),
    language_attention=(*LANGUAGE_ATTENTION, *GATED_DELTANET),  # a Qwen3.5 decoder
    language_keep_16bit=GATED_DELTANET_16BIT,
    extra_inputs=("target_sizes",),
    processor_class="MiniCPMV4_6ImageOnlyProcessor",  # its images only, with or without torchvision
    prepare_processor_import=shims.minicpmv4_6_image_only_processor,
    tokens_per_image=it.minicpm_tokens,
    image_layout=it.minicpm_layout,
    pixel_budget=it.minicpm_budget,
    image_settings=it.minicpm_settings,
    config_image_settings=it.minicpm_settings_from_config,
    block_lists=("model.vision_tower.encoder.layers", "model.language_model.layers"),
    packing_refused="its Qwen3.5 decoder's Gated DeltaNet layers carry a recurrent state along the whole row, "
    "across the boundaries of packed samples (as Qwen3.5's)",
)

# --- issue 25, the remaining MoE families (appended here to ease merging) ---------------------------------

GLM4V_MOE = Family(
    name="glm4v_moe",
    tiny_builder="vlmtune.model.tiny.glm:build_glm4v_moe",
    title="GLM-4.5V",
    # Kernels not proven for it yet (tests/test_kernels_patching.py): its experts are fused 3-D tensors, its
    # rotary is not rotate-half
    mlp_activation=None,
    rope=None,
    model_types=("glm4v_moe",),
    processor_class="Glm4vProcessor",
    # GLM-4.5-Air's decoder: the dense first layer's MLP and the shared expert (mlp.shared_experts.*) have
    # separate gate/up/down_proj (4-bit, LoRA); the routed experts are fused 3-D tensors as Qwen's, and the
    # router mlp.gate is a bare weight with a correction bias (no Linear)
    **{**_GLM_V, "language_mlp": LANGUAGE_MLP},
    expert_parameters=QWEN_EXPERTS,
    expert_count_keys=("n_routed_experts", "num_experts_per_tok"),
    router="mlp.gate",
    refused_objectives=(
        (
            "dpo",
            "TRL 1.16's DPO adds the experts' load-balancing loss with text_config.num_experts, which GLM-4.5V's "
            "config names n_routed_experts: the first step fails with an AttributeError",
        ),
        ("kto", "TRL 1.16's KTO adds the same load-balancing loss as its DPO, with the same AttributeError"),
    ),
)

LLAMA4 = Family(
    name="llama4",
    tiny_builder="vlmtune.model.tiny.llama4:build_llama4",
    title="Llama 4",
    # Kernels not proven for it yet (tests/test_kernels_patching.py): fused experts, complex-valued rotary,
    # an L2 norm of queries and keys beside the RMSNorms
    norm=None,
    mlp_activation=None,
    rope=None,
    model_types=("llama4",),
    # No `model.` wrapper: the towers hang off the top module, and the decoder sits inside a causal LM
    vision_prefix="vision_model",
    # the pixel-shuffle MLP (vision_adapter) maps the tower's patches to tokens: a projector, as Qwen's merger
    projector_prefixes=("multi_modal_projector", "vision_model.vision_adapter"),
    language_prefix="language_model.model",
    lm_head="language_model.lm_head",
    image_token="<|image|>",
    feature_token="<|patch|>",  # the config's image_token_index: what image features replace
    structural_tokens=("<|image_start|>", "<|image_end|>", "<|tile_x_separator|>", "<|tile_y_separator|>"),
    vision_attention=LANGUAGE_ATTENTION,  # self_attn.q/k/v/o_proj: anchored on vision_model
    vision_mlp=("mlp.fc1", "mlp.fc2"),
    # language_mlp's gate/up/down_proj are the shared expert's (feed_forward.shared_expert.*) and, in the
    # checkpoints that interleave dense layers (Maverick), the dense MLP's: 4-bit, LoRA
    expert_parameters=("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"),
    expert_count_keys=("num_local_experts", "num_experts_per_tok"),
    router="feed_forward.router",  # a Linear subclass: kept 16-bit by keep_16bit()
    processor_class="Llama4Processor",
    prepare_processor_import=shims.llama4_image_processor_without_torchvision,
    tokens_per_image=it.llama4_tokens,
    image_layout=it.llama4_tiles,  # the tile grid decides where the separators go
    pixel_budget=it.llama4_budget,
    image_settings=it.llama4_settings,
    config_image_settings=it.llama4_settings_from_config,
    block_lists=("vision_model.model.layers", "language_model.model.layers"),
    cast_pixel_values=True,
    refused_objectives=(
        (
            "dpo",
            "TRL 1.16's DPO takes the decoder's last_hidden_state from the model's backbone, and Llama 4 has none "
            "(its language_model is a causal LM with its own head): the first step fails with an AttributeError",
        ),
        (
            "kto",
            "TRL 1.16's KTO reads the decoder's last_hidden_state as its DPO does, with the same AttributeError",
        ),
        (
            "grpo",
            "TRL 1.16's GRPO splits tile-indexed pixel_values per prompt by asking the image processor for "
            "InternVL's num_patches (crop_to_patches=True), which Llama 4's image processor does not give",
        ),
    ),
    packing_refused="its NoPE layers scale attention by a token's index in the row (attn_temperature_tuning, "
    "from floor_scale = 8192 tokens on), not in its sample, so a packed sample past that index would attend "
    "otherwise than alone (tried: a packed row shorter than that matched its samples exactly, the chunked "
    "attention included; no record field limits a row's length yet)",
)

# LFM2's short-convolution layers: conv.in_proj (hidden -> 3 x hidden: the input and output gates and the
# value) and conv.out_proj are wide Linears, 4-bit and LoRA as attention's; the depthwise conv1d between them
# (kernel conv_L_cache = 3, no Linear) stays 16-bit and untrained.
LFM2_SHORT_CONV = ("conv.in_proj", "conv.out_proj")

LFM2_VL = Family(
    name="lfm2_vl",
    tiny_builder="vlmtune.model.tiny.lfm2:build_lfm2_vl",
    title="LFM2-VL",
    # Kernels not proven for it yet (tests/test_kernels_patching.py): its MLP is w1/w3/w2, its attention
    # normalises queries and keys, and its convolution layers have no rotary
    norm=None,
    mlp_activation=None,
    rope=None,
    model_types=("lfm2_vl",),
    vision_prefix="model.vision_tower",  # SigLIP2 (NaFlex): q/k/v/out_proj, fc1/fc2
    projector_prefixes=("model.multi_modal_projector",),
    language_prefix="model.language_model",
    image_token="<image>",
    structural_tokens=(
        "<|image_start|>",
        "<|image_end|>",
        "<|img_thumbnail|>",
        *(f"<|img_row_{r}_col_{c}|>" for r in range(1, 11) for c in range(1, 11) if r * c <= 10),
    ),
    language_attention=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        *LFM2_SHORT_CONV,
    ),  # output projections last in each kind
    language_mlp=("feed_forward.w1", "feed_forward.w3", "feed_forward.w2"),
    extra_inputs=("pixel_attention_mask", "spatial_shapes"),
    processor_class="Lfm2VlProcessor",
    prepare_processor_import=shims.lfm2_vl_image_processor_without_torchvision,
    tokens_per_image=it.lfm2_tokens,
    image_layout=it.lfm2_tiles,  # the tile grid decides the <|img_row_R_col_C|> markers
    pixel_budget=it.lfm2_budget,
    image_settings=it.lfm2_settings,
    config_image_settings=it.lfm2_settings_from_config,
    block_lists=("model.vision_tower.encoder.layers", "model.language_model.layers"),
    packing_refused="its short-convolution layers mix each token with the two before it in the row, so a packed "
    "sample's first tokens would read the previous sample's last ones (tests/test_packing.py: a packed row's "
    "loss differed from its samples' by 5e-4 relative, and agreed to 2e-8 with each convolution cut to its "
    "current-token tap)",
)

FAMILIES: tuple[Family, ...] = (
    QWEN2_VL,
    QWEN2_5_VL,
    QWEN3_VL,
    LLAVA,
    LLAVA_NEXT,
    LLAVA_ONEVISION,
    PIXTRAL,
    MISTRAL3,
    GEMMA3,
    MLLAMA,
    IDEFICS3,
    SMOLVLM,
    PALIGEMMA,
    INTERNVL,
    # issue 25: the newest architectures of transformers 5.23
    QWEN3_5,
    QWEN3_VL_MOE,
    QWEN3_5_MOE,
    GEMMA4,
    GLM4V,
    GLM46V,
    AYA_VISION,
    MINICPMV4_6,
    GLM4V_MOE,
    LLAMA4,
    LFM2_VL,
)


def check_objective(family: Family, objective: str) -> None:
    """Stop before any weight loads when the record says this family cannot serve ``objective``."""
    reason = family.refusal(objective)
    if reason:
        raise ModelError(
            f"{family.title} cannot be trained with train.objective: {objective}: {reason}",
            hint="choose another train.objective for this family (docs/families.md lists what each serves)",
        )


def family_names() -> list[str]:
    return [f.name for f in FAMILIES]


def get_family(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ModelError(f"unknown family {name!r}", hint=f"choose one of: {', '.join(family_names())}")


def detect_family(config: Any) -> Family:
    """Pick the record for a transformers config (or its dict) from its model types."""
    as_dict: Mapping[str, Any] = config if isinstance(config, Mapping) else config.to_dict()
    model_type = as_dict.get("model_type")
    vision_type = (as_dict.get("vision_config") or {}).get("model_type")
    for family in FAMILIES:  # the specific match (vision model type) wins over the plain one
        if vision_type and vision_type in family.vision_model_types and model_type in family.model_types:
            return family
    for family in FAMILIES:
        if model_type in family.model_types and not family.vision_model_types:
            return family
    supported = ", ".join(f"{f.title} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise ModelError(
        f"unsupported architecture: model_type {model_type!r}"
        + (f" with a {vision_type!r} vision tower" if vision_type else ""),
        hint=f"vlmtune supports {supported}. To add one, see docs/adding-a-family.md.",
    )
