"""Shared command-line behaviour: quiet third-party start-up noise so a CLI's own lines (and its one-line errors)
are what the user reads."""

from __future__ import annotations

import logging
import warnings


def quiet_library_warnings() -> None:
    """Hide import-time chatter of megatron-core/torch/DeepSpeed on machines without apex/TE or CUDA."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
