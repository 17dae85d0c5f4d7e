"""Silence the library warnings a fedquant user can do nothing about, by their exact text.

Each entry is one known message from one logger or of one warning category, with the reason it
is harmless here; everything else those loggers and categories say still shows. The CLI calls
:func:`quiet_known_warnings` before any work (``fedquant --debug`` skips it).
"""

from __future__ import annotations

import logging
import re
import warnings

# (logger name, regex searched in the formatted message): such records are dropped at that logger.
KNOWN_LOG_RECORDS = (
    # torch's ONNX exporter registers torchvision's ops when it starts; fedquant exports no vision op.
    ("torch.onnx._internal.exporter._registration", r"^torchvision is not installed\. Skipping torchvision::"),
    # Flower 1.42 deprecates run_simulation for `flwr run`; fedquant simulate calls it on purpose
    # (one process with its own progress display), and `flwr run .` is offered too.
    ("flwr", r"The `run_simulation` function is deprecated"),
)

# (regex matched at the start of the message, category), as warnings.filterwarnings takes them.
KNOWN_WARNINGS = (
    # torch's exporter itself copies a pytree LeafSpec, its own deprecated class (via copyreg).
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # ray.init on a CPU-only run: a change of how Ray treats GPU visibility, no GPU is used here.
    (r"Tip: In future versions of Ray, Ray will no longer override accelerator visible devices", FutureWarning),
)


class DropMessage(logging.Filter):
    """Drops the records of one logger whose message matches ``pattern``."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:       # a record that cannot be formatted is not one of ours
            return True
        return self.pattern.search(message) is None


def quiet_known_warnings() -> None:
    """Install the filters (idempotent: calling it twice adds nothing)."""
    for name, pattern in KNOWN_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(DropMessage(pattern))
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
