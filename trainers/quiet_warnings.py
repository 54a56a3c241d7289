"""Silence third-party messages known to be harmless, at their source, in the trainer process.

Each filter names the logger (or warning) that emits one message and matches that message only, so the
same libraries' other warnings, our own warnings and every error still reach the console and the UI's log
tail (the UI runs the trainer as a child process and shows its output). Installed by `python -m trainers`
before diffusers or transformers are imported.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Callable

_installed = False


def _torchao_kernel_for_elsewhere(message: str) -> bool:
    """torchao tries every bundled kernel library; one built for another Python (cpython-310 in 3.11) or
    for CUDA on a build without it cannot load and is never used here."""
    match = re.match(r"Failed to load .*torchao.*?/(_C[^/]*\.so)", message)
    if not match:
        return False
    abi = re.search(r"cpython-(\d+)", match.group(1))
    if abi:
        return abi.group(1) != f"{sys.version_info.major}{sys.version_info.minor}"
    import torch

    return not torch.cuda.is_available()


def _load_report_of_unused_keys_only(message: str) -> bool:
    """transformers' LOAD REPORT table when it lists only UNEXPECTED keys (weights in the file that the
    model does not use: ignored when loading); MISSING, MISMATCH or CONVERSION rows are kept."""
    return "LOAD REPORT" in message and not any(
        word in message for word in ("MISSING", "MISMATCH", "CONVERSION")
    )


# (logger name, predicate on the formatted message): the record is dropped when the predicate holds.
LOGGER_FILTERS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("torchao", _torchao_kernel_for_elsewhere),
    # torchao registers Enums with torch's pytree, which torch now says it need not do
    ("torch.utils._pytree", lambda m: "is an Enum subclass and is now natively supported" in m),
    # diffusers' torchao quantizer probing types of torchao versions it was not written for
    (
        "diffusers.quantizers.torchao.torchao_quantizer",
        lambda m: m.startswith("Unable to import `torchao` Tensor objects"),
    ),
    # `.to(dtype)` on a model whose list of modules to keep in fp32 is empty: nothing is affected
    ("diffusers.models.modeling_utils", lambda m: "should be kept in float32: []" in m),
    # CLIP/Siglip image processors (unused: we never process images with them) fall back to PIL
    ("transformers.utils.import_utils", lambda m: "requires torchvision (not installed); falling back" in m),
    ("transformers.modeling_utils", _load_report_of_unused_keys_only),
    ("transformers.utils.loading_report", _load_report_of_unused_keys_only),
)

# Python warnings: (message regex, category).
WARNING_FILTERS: tuple[tuple[str, type[Warning]], ...] = (
    # torchvision < 0.17 on import of transforms.v2, which diffusers/transformers touch and we never use
    (r"The torchvision\.(datapoints|tv_tensors) and torchvision\.transforms\.v2 namespaces", UserWarning),
    (r"Failed to load image Python extension", UserWarning),  # torchvision.io, unused
)


class _DropKnown(logging.Filter):
    def __init__(self, is_harmless: Callable[[str], bool]) -> None:
        super().__init__()
        self.is_harmless = is_harmless

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot format is not ours to judge
            return True
        return not self.is_harmless(message)


def install() -> None:
    """Add the filters (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name, predicate in LOGGER_FILTERS:
        logging.getLogger(name).addFilter(_DropKnown(predicate))
    install_warning_filters()


def install_warning_filters() -> None:
    """The `warnings` filters alone (they are per process state that `warnings.catch_warnings` resets)."""
    for pattern, category in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
