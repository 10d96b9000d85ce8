"""Messages of other libraries that a user can do nothing about, dropped at their logger.

Each entry is one message of one logger, matched by its start; everything else that logger says
still shows. A filter on the logger itself (not a handler) drops the record before any handler,
Python's last-resort stderr printer included.
"""

from __future__ import annotations

import logging

# (logger name, how the message starts, why it is noise)
KNOWN_NOISE = (
    (
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        # On CPUs with AVX512-BF16 bitsandbytes tries an optional faster kernel from the hub and
        # falls back to its own, which works (FACTS.md); vlmtune is offline and needs neither.
        "optional kernel; the built-in fallback is used",
    ),
)


class DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_known_noise() -> None:
    """Install the filters (idempotent). Loggers that do not exist yet are created and keep them."""
    for logger_name, prefix, _why in KNOWN_NOISE:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(DropMessage(prefix))
