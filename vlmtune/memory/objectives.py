"""The terms only the objectives beyond sft add: sampling (grpo) and the frozen reference (dpo, grpo).

- generation (objectives that sample, grpo): the KV cache of every sequence sampled at once
  (TRL generates a whole optimizer step's completions together: batch_size x grad_accum), each
  as long as the prompt plus the completion, over every language layer's keys and values; plus
  the fp32 logits and probabilities of one sampling step.
- reference (preference tuning, dpo): each pair is two sequences (chosen, rejected), so the
  activations and the loss see twice the batch (``TrainingMethod.sequences``, counted in
  vlmtune.memory.activations). The reference model
  costs no second copy for LoRA (the adapter is disabled), a frozen fp32 copy of the adapter when
  it continues an earlier run's, and a second copy of the weights for full fine-tuning. Its
  no-grad forward frees each layer as it goes, within what backward needs later anyway. GRPO
  (with beta > 0) and KTO hold the same reference. KTO's sample is one sequence with gradients; its
  KL sequence (the prompt with another sample's answer) and the reference see only no-grad forwards.
"""

from __future__ import annotations

from vlmtune.choices import DTYPE_BYTES
from vlmtune.memory.records import SAMPLING_LOGITS, TrainingMethod, Workload
from vlmtune.memory.shape import ModelShape
from vlmtune.memory.weights import weight_components


def kv_elems_per_token(model: ModelShape) -> int:
    """Key and value elements one token leaves in the cache, over every language layer (an upper
    bound for sliding-window and cross-attention layers, which keep fewer)."""
    return sum(
        lin.out_features
        for lin in model.linears
        if lin.component == "language" and lin.name.rsplit(".", 1)[-1] in ("k_proj", "v_proj")
    )


def generation_bytes(model: ModelShape, training: TrainingMethod, work: Workload) -> int:
    """Sampling: the KV cache of every sequence generated at once, plus one step's logits."""
    cache = work.generations * work.sequence * kv_elems_per_token(model) * DTYPE_BYTES[training.dtype]
    return cache + work.generations * model.vocab_size * 4 * SAMPLING_LOGITS


def reference_bytes(model: ModelShape, training: TrainingMethod, lora: int) -> int:
    """The frozen reference dpo and kto (and grpo with beta > 0) measure against: none for a fresh adapter (it
    is disabled), a frozen copy of a continued adapter, a second copy of the weights for full fine-tuning."""
    if training.objective not in ("dpo", "kto", "grpo") or not training.reference:
        return 0
    if training.method == "full":
        return sum(c.bytes for c in weight_components(model, training))
    if training.continues_adapter:  # TRL's "ref" copy stays fp32 while a quantized model's adapter is bf16
        return lora * (2 if training.quantized else 1)
    return 0
