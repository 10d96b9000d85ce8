"""TRL's SFTTrainer with vlmtune's loss: lm_head and cross-entropy on supervised positions only.

What makes a run stop and resume exactly (data order, weights in their dtype, complete checkpoints,
the non-finite guard) comes from vlmtune.training.reliable_trainer.
"""

from __future__ import annotations

from typing import Any

from trl import SFTTrainer

from vlmtune.training.loss import lm_head_input, logit_transform, supervised_cross_entropy
from vlmtune.training.reliable_trainer import ReliableTrainerMixin


class VlmtuneTrainer(ReliableTrainerMixin, SFTTrainer):
    """SFTTrainer whose loss skips the positions that carry no label (prompt, image tokens, pad).

    With ``supervised_loss=False`` it is TRL's own loss path, unchanged.
    """

    def __init__(self, *args: Any, supervised_loss: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.supervised_loss = supervised_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._log_padding(inputs)
        if not self.supervised_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        model_inputs["use_cache"] = False
        causal_lm = self.accelerator.unwrap_model(model)
        causal_lm = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
        lm_head = causal_lm.get_output_embeddings()
        with lm_head_input(lm_head) as captured:
            outputs = model(**model_inputs)
        result = supervised_cross_entropy(
            captured.hidden,
            labels,
            lm_head,
            num_items_in_batch,
            **logit_transform(causal_lm.config.get_text_config()),
        )
        loss = result.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: DDP averages gradients
        mode = "train" if model.training else "eval"
        if result.count:
            self._metrics[mode]["mean_token_accuracy"].append(result.correct / result.count)
        return (loss, outputs) if return_outputs else loss

    def _log_padding(self, inputs: dict) -> None:
        """Fraction of the batch that is padding: what length grouping is there to cut."""
        mask = inputs.get("attention_mask")
        if mask is not None and self.model.training:
            self._metrics["train"]["padding_fraction"].append(1.0 - mask.float().mean().item())
