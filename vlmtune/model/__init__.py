"""What a model is: its family record, how many tokens an image becomes, where its checkpoint is, how to read it.

Family records (``families``) and image-token arithmetic (``image_tokens``); finding a checkpoint
before any weight loads (``checkpoint``) and the bundled real-shape configs (``configs/``);
reading a loaded model (``modelinfo``); processors (``processing``, ``shims``); gradient
checkpointing of every block the record names (``checkpointing``); which Linears LoRA wraps
(``lora_targets``); tiny random checkpoints of every family (``tiny``).
"""
