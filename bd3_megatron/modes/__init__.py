"""The model modes (BD3-LM and its baselines on the same backbone) and their registry.

``get_mode(cfg.model.mode)`` is the only place a mode name is looked up; everything else asks the mode object.
"""

from __future__ import annotations

from bd3_megatron.modes.ar import AR
from bd3_megatron.modes.base import MaskedDiffusionMode, ModelMode
from bd3_megatron.modes.bd3 import BD3
from bd3_megatron.modes.mdlm import MDLM
from bd3_megatron.modes.sedd import SEDD

MODES: dict[str, ModelMode] = {m.name: m for m in (BD3(), MDLM(), AR(), SEDD())}


def get_mode(name: str) -> ModelMode:
    """The mode registered as ``name``; ValueError naming the known modes otherwise."""
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"model.mode must be one of {'|'.join(MODES)}, got {name!r}") from None


__all__ = ["MODES", "MaskedDiffusionMode", "ModelMode", "get_mode"]
