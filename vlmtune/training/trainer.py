"""TRL's SFTTrainer with vlmtune's loss: lm_head and cross-entropy on supervised positions only.

What makes a run stop and resume exactly (data order, weights in their dtype, complete checkpoints,
the non-finite guard) comes from vlmtune.training.reliable_trainer.
"""

from __future__ import annotations

from typing import Any

from trl import SFTTrainer

from vlmtune.data.packing import PACKING_KEYS, SAMPLE_LENGTHS
from vlmtune.training.loss import lm_head_input, logit_transform, supervised_cross_entropy
from vlmtune.training.packed import PackedRowSampler, is_packed, packed_positions
from vlmtune.training.packed_attention import SAMPLE_LENGTHS_KWARG, use_per_sample_attention
from vlmtune.training.reliable_trainer import ReliableTrainerMixin


class VlmtuneTrainer(ReliableTrainerMixin, SFTTrainer):
    """SFTTrainer whose loss skips the positions that carry no label (prompt, image tokens, pad).

    With ``supervised_loss=False`` it is TRL's own loss path, unchanged.

    Packed batches (vlmtune.data.packing; ``family`` says how its positions are built) get their
    position ids here, where the model's rope index is at hand; ``packed_weights`` (tokens per
    packed row) switch the training order to the packed rows' epoch-seeded order, heaviest row first
    when ``heaviest_first``, and the language model's attention to one that pays only each sample's
    own (vlmtune.training.packed_attention) unless it runs flash attention.
    """

    def __init__(
        self,
        *args: Any,
        supervised_loss: bool = True,
        family: Any = None,
        packed_weights: list[int] | None = None,
        heaviest_first: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.supervised_loss = supervised_loss
        self.family = family
        self.packed_weights = packed_weights
        self.heaviest_first = heaviest_first
        # the language model's attention while it trains packed rows (None: not packing)
        self.packed_attention = None if packed_weights is None else use_per_sample_attention(self.model)

    def _get_train_sampler(self, train_dataset=None):
        if self.packed_weights is None:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return PackedRowSampler(self.packed_weights, seed, self.heaviest_first)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._log_padding(inputs)
        causal_lm = self.accelerator.unwrap_model(model)
        causal_lm = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
        if is_packed(inputs):
            inputs = unpacked_keys(inputs, packed_positions(causal_lm, self.family, inputs))
        if not self.supervised_loss:
            return super().compute_loss(
                model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch
            )
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        model_inputs["use_cache"] = False  # a cache switches transformers' packed-sequence masks off
        lm_head = causal_lm.get_output_embeddings()
        with lm_head_input(lm_head) as captured:
            outputs = model(**model_inputs)
        result = supervised_cross_entropy(
            captured.hidden,
            labels,
            lm_head,
            num_items_in_batch,
            **logit_transform(causal_lm.config),
        )
        loss = result.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: DDP averages gradients
        mode = "train" if model.training else "eval"
        if result.count:
            self._metrics[mode]["mean_token_accuracy"].append(result.correct / result.count)
        return (loss, outputs) if return_outputs else loss

    def _log_padding(self, inputs: dict) -> None:
        """Real (non-pad) tokens and samples per optimizer step on this rank, and the fraction of each
        batch that is padding (what length grouping and packing are there to cut)."""
        if not self.model.training:
            return
        if is_packed(inputs):  # one row, no padding
            lengths = inputs[SAMPLE_LENGTHS]
            real, samples, padding = int(lengths.sum()), len(lengths), 0.0
        elif inputs.get("attention_mask") is not None:
            mask = inputs["attention_mask"]
            real, samples, padding = int(mask.sum()), mask.shape[0], 1.0 - mask.float().mean().item()
        else:
            return
        steps = self.args.gradient_accumulation_steps  # the logged value is a mean over forward batches
        metrics = self._metrics["train"]
        metrics["padding_fraction"].append(padding)
        metrics["real_tokens"].append(float(real * steps))
        metrics["samples"].append(float(samples * steps))


def unpacked_keys(inputs: dict, position_ids: Any) -> dict:
    """A packed batch as the model takes it: its positions, its sample lengths (for the per-sample
    attention; other attention functions ignore them), no packing bookkeeping, no attention mask."""
    model_inputs = {k: v for k, v in inputs.items() if k not in PACKING_KEYS and k != "attention_mask"}
    model_inputs["position_ids"] = position_ids
    model_inputs[SAMPLE_LENGTHS_KWARG] = tuple(int(n) for n in inputs[SAMPLE_LENGTHS])
    return model_inputs
