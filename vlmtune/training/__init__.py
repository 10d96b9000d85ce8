"""What runs inside the trainer: the loss, the trainer classes, callbacks, exact resume, the guards, rewards.

``loss`` scores only supervised positions; ``trainer`` is SFT's TRL trainer with it;
``reliable_trainer`` the mixin every objective's trainer takes (seeded data order, exact resume,
complete checkpoints); ``finite`` the non-finite guard; ``callbacks`` metrics.jsonl and the
progress bar; ``rewards`` GRPO's rewards.
"""
