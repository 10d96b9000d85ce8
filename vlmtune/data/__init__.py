"""From records on disk to the tensors a model trains on: reading, checking and rendering samples.

``sources`` reads records lazily, ``layouts`` (with ``flat``, ``parts``, ``preference``) normalises
each record into a ``Sample`` or a pair, ``images`` opens and proves images; the pre-flight
(``preflight``) is the one reader of whole splits that training, `data check` (``check``) and eval
share, measuring exact lengths (``lengths``) without decoding pixels; the collators
(``collator``, ``preference_collator``) render samples through the processor with labels on the
answers only; ``prompts`` splits a sample at its last answer (eval, GRPO).
"""

from vlmtune.data.images import open_image
from vlmtune.data.layouts import SampleReader
from vlmtune.data.samples import Problem, Sample, SampleError, invalid_samples_error
from vlmtune.data.sources import Records, RowImage, open_records

__all__ = [
    "Problem",
    "Records",
    "RowImage",
    "Sample",
    "SampleError",
    "SampleReader",
    "invalid_samples_error",
    "open_image",
    "open_records",
]
