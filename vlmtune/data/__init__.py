"""Reading datasets: sources (files, saved datasets, the hub) -> records -> Samples.

``sources`` reads records lazily, ``layouts`` normalises each record into a ``Sample``; the
pre-flight (vlmtune.preflight) is the one reader of whole splits that training, `data check`
and eval share.
"""

from vlmtune.data.layouts import SampleReader
from vlmtune.data.samples import Problem, Sample, SampleError, invalid_samples_error
from vlmtune.data.sources import Records, RowImage, open_records
from vlmtune.images import open_image

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
