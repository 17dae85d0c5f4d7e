"""simulation.quiet hides the known library warnings, each by its text, and nothing else."""

import logging
import warnings

from simulation.quiet import KNOWN_LOG_RECORDS, DropMessage, quiet_known_warnings


def _passes(logger_name: str, message: str, *args) -> bool:
    logger = logging.getLogger(logger_name)
    return bool(logger.filter(logger.makeRecord(logger_name, logging.WARNING, __file__, 1, message, args, None)))


def test_known_log_records_are_dropped_and_others_kept():
    quiet_known_warnings()
    quiet_known_warnings()                  # idempotent
    try:
        reg = "torch.onnx._internal.exporter._registration"
        assert not _passes(reg, "torchvision is not installed. Skipping %s", "torchvision::nms")
        assert _passes(reg, "something else is not installed. Skipping %s", "x::y")
        assert _passes("torch.onnx", "torchvision is not installed. Skipping %s", "torchvision::nms")
        flwr_text = "DEPRECATED FEATURE: %s\n\n   This is a deprecated feature."
        assert not _passes("flwr", flwr_text, "The `run_simulation` function is deprecated and will be removed")
        assert _passes("flwr", flwr_text, "The `start_server` function is deprecated")
        assert _passes("flwr", "round 3: 2 replies")
        for name, _ in KNOWN_LOG_RECORDS:
            assert sum(isinstance(f, DropMessage) for f in logging.getLogger(name).filters) == 1
    finally:
        for name, _ in KNOWN_LOG_RECORDS:
            logger = logging.getLogger(name)
            for f in [f for f in logger.filters if isinstance(f, DropMessage)]:
                logger.removeFilter(f)


def test_known_warnings_are_ignored_and_others_shown():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, "
                      "TreeSpec) and treespec.is_leaf()` instead.", FutureWarning)
        warnings.warn("Tip: In future versions of Ray, Ray will no longer override accelerator visible "
                      "devices env var if num_gpus=0", FutureWarning)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", DeprecationWarning)   # other category
        warnings.warn("some other FutureWarning", FutureWarning)
    assert [(w.category, str(w.message)) for w in seen] == [
        (DeprecationWarning, "`isinstance(treespec, LeafSpec)` is deprecated"),
        (FutureWarning, "some other FutureWarning")]
