"""The reference's own training checkpoints (bd3lms ``diffusion.py`` under PyTorch Lightning: ``*.ckpt``), read
without executing pickled code.

A Lightning ``.ckpt`` is a torch zip file whose pickle holds ``state_dict`` (the ``Diffusion`` module: ``backbone.*``
= the DiT, ``sampling_eps_min/max`` buffers), ``ema`` (``models/ema.py``: ``{"decay", "num_updates",
"shadow_params": [tensor, ...]}`` in the order of ``backbone.parameters()`` then ``noise.parameters()``),
``optimizer_states``, ``loops``, ``callbacks`` and ``hyper_parameters`` (the Hydra/OmegaConf run config and the
tokenizer object). :class:`RestrictedUnpickler` admits torch's tensor rebuild functions, storages, ``OrderedDict`` and
plain containers; the objects of a short list of data-only libraries that appear in ``hyper_parameters``
(OmegaConf containers and nodes, Hugging Face tokenizers, numpy arrays) become inert :class:`Opaque` records
whose constructors and ``__setstate__`` are never called; any other global (``os.system``, ``builtins.eval``,
``subprocess.Popen``, ...) raises ``UnsafeCheckpoint`` naming it, before anything it names could run.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import types
from pathlib import Path
from typing import Any

import torch

# globals whose real objects are admitted: torch's tensor reconstruction and plain containers
_ADMITTED = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),  # its factory is itself a global checked here, and only called on a missing key
    ("_codecs", "encode"),  # bytes in protocol-2 pickles (numpy buffers); torch's weights_only loader admits it too
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "bool"),
    ("builtins", "str"),
    ("builtins", "bytes"),
    ("builtins", "complex"),
}
_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
# modules whose objects (in hyper_parameters, callbacks, sampler state) are kept as inert records, never built
_INERT_PREFIXES = ("omegaconf.", "transformers.", "tokenizers.", "numpy.", "typing.", "pathlib.", "enum.")
_INERT_MODULES = {"omegaconf", "transformers", "tokenizers", "numpy", "typing", "pathlib", "enum"}


# the reference's tokenizers (data.tokenizer_name_or_path) -> (vocabulary incl. [MASK], mask id): GPT-2 has no mask
# token, so the reference appends one as the last id; BERT's own [MASK] is 103
KNOWN_TOKENIZERS = {"gpt2": (50258, 50257), "bert-base-uncased": (30522, 103)}


class UnsafeCheckpoint(ValueError):
    """The pickle names a global that could execute code when loaded."""


class Opaque:
    """An inert stand-in for an object of a data-only library: records what it was and its arguments/state."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):  # an opaque class or function "called" by REDUCE: another record
        return Opaque(self, *args, **kwargs)


def _opaque_class(module: str, name: str) -> type:
    return type(f"Opaque[{module}.{name}]", (Opaque,), {"__module__": __name__, "qualname": f"{module}.{name}"})


class RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` admits tensors, storages and plain containers, turns the objects of data-only libraries into
    :class:`Opaque` records, and raises :class:`UnsafeCheckpoint` for every other global."""

    def find_class(self, module: str, name: str):
        # protocol-2 pickles (torch.save's) name Python 2 modules, e.g. __builtin__.dict: map them as pickle does
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ADMITTED:
            return super().find_class(module, name)
        if module == "torch" and (name.endswith("Storage") or name in _DTYPES):
            return getattr(torch, name)
        if module in _INERT_MODULES or module.startswith(_INERT_PREFIXES):
            return _opaque_class(module, name)
        raise UnsafeCheckpoint(
            f"the checkpoint's pickle names the global {module}.{name}, which could run code when loaded; "
            f"refused (only tensors and plain containers are read)"
        )


_PICKLE_MODULE = types.SimpleNamespace(Unpickler=RestrictedUnpickler, load=None, __name__="restricted_pickle")


def load_ckpt(path: str | Path) -> dict[str, Any]:
    """The top-level dict of a Lightning ``.ckpt`` (torch zip format), unpickled by :class:`RestrictedUnpickler`.
    Raises UnsafeCheckpoint for a code-executing global, ValueError for anything that is not such a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    try:
        # torch's zip reader supplies the storages (persistent ids) and hands every other global to our find_class
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE_MODULE)
    except UnsafeCheckpoint:
        raise
    except Exception as exc:  # torch raises several types for damaged or non-zip files
        raise ValueError(f"cannot read {path} as a torch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return obj


def _plain(obj: Any) -> Any:
    """An OmegaConf container recorded by :class:`Opaque` as plain dicts/lists/values (best effort)."""
    if isinstance(obj, Opaque):
        state = obj.state if isinstance(obj.state, dict) else {}
        if "_content" in state:
            return _plain(state["_content"])
        if "_val" in state:
            return _plain(state["_val"])
        return None
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def reference_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The run config the reference saved (``hyper_parameters["config"]``) as plain values, {} when absent."""
    hp = _plain(ckpt.get("hyper_parameters") or {})
    cfg = hp.get("config") if isinstance(hp, dict) else None
    return cfg if isinstance(cfg, dict) else {}


def to_hf_state(ckpt: dict[str, Any], weights: str, where: str) -> dict[str, torch.Tensor]:
    """The reference model's tensors under HF ``BD3LM`` names (``backbone.*`` + the clip-window buffers) from the
    Lightning state: ``weights`` = "ema" (the EMA shadow, mapped to names by parameter order) or "raw"."""
    sd = {k.replace("_orig_mod.", ""): v for k, v in ckpt["state_dict"].items()}
    out = {k: v for k, v in sd.items() if k.startswith("backbone.") or k in ("sampling_eps_min", "sampling_eps_max")}
    if not any(k.startswith("backbone.") for k in out):
        raise ValueError(f"{where}: state_dict has no backbone.* tensors; not a bd3lms Diffusion checkpoint")
    for k in ("sampling_eps_min", "sampling_eps_max"):  # on_save_checkpoint's copies win over the buffers
        if torch.is_tensor(ckpt.get(k)):
            out[k] = ckpt[k]
    if weights == "raw":
        return out
    ema = ckpt.get("ema")
    if not isinstance(ema, dict) or not isinstance(ema.get("shadow_params"), (list, tuple)):
        raise ValueError(f"{where} holds no EMA (its run had training.ema=0); use the raw weights (--raw)")
    # parameters in registration order = state_dict order without the buffers (rotary table, clip window)
    params = [k for k in out if k.startswith("backbone.") and not k.endswith("rotary_emb.inv_freq")]
    shadow = list(ema["shadow_params"])
    if len(shadow) != len(params):
        raise ValueError(
            f"{where}: the EMA has {len(shadow)} tensors but the backbone {len(params)} parameters; "
            f"the checkpoint's noise schedule has parameters or the file is damaged"
        )
    for name, t in zip(params, shadow, strict=True):
        if tuple(t.shape) != tuple(out[name].shape):
            raise ValueError(f"{where}: EMA tensor for {name} has shape {tuple(t.shape)}, not {tuple(out[name].shape)}")
        out[name] = t
    return out


def hf_config_from(ckpt: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    """An HF ``BD3LM`` config.json dict for the checkpoint: sizes from the tensors, the rest from the saved run
    config (model.length, block_size, algo.cross_attn / time_conditioning, model.dropout). Raises ValueError when
    the run config cannot be read and so the sequence length and block size are unknown."""
    cfg = reference_config(ckpt)
    model, algo = cfg.get("model") or {}, cfg.get("algo") or {}
    length, block = model.get("length"), cfg.get("block_size", model.get("length"))
    if not isinstance(length, int) or not isinstance(block, int):
        raise ValueError(
            f"{where}: hyper_parameters.config lacks model.length / block_size, so L and L' are unknown; export the "
            f"run with the reference's push_to_hf.py (an HF folder) and convert that"
        )
    vocab, hidden = state["backbone.vocab_embed.embedding"].shape
    n_blocks = len({k.split(".")[2] for k in state if k.startswith("backbone.blocks.")})
    head_dim = 2 * state["backbone.rotary_emb.inv_freq"].shape[0]
    adaln = "backbone.blocks.0.adaLN_modulation.weight" in state
    out = {
        "model_type": "bd3lm",
        "block_size": block,
        "vocab_size": int(vocab),
        "model_length": length,
        "cross_attn": bool(algo.get("cross_attn", True)),
        "adaln": adaln,
        "causal": bool(model.get("causal_attention", algo.get("parameterization") == "ar")),
        "hidden_dim": int(hidden),
        "n_blocks": n_blocks,
        "n_heads": int(hidden) // head_dim,
        "time_conditioning": bool(algo.get("time_conditioning", False)),
    }
    if adaln:
        out["cond_dim"] = int(state["backbone.blocks.0.adaLN_modulation.weight"].shape[1])
    tokenizer = (cfg.get("data") or {}).get("tokenizer_name_or_path")
    if tokenizer in KNOWN_TOKENIZERS and KNOWN_TOKENIZERS[tokenizer][0] == int(vocab):
        out["bd3_megatron"] = {"tokenizer": tokenizer, "mask_token_id": KNOWN_TOKENIZERS[tokenizer][1]}
    if model.get("dropout") is not None:
        out["dropout"] = float(model["dropout"])
    if "sampling_eps_min" in state:
        out["sampling_eps_min"] = float(state["sampling_eps_min"])
        out["sampling_eps_max"] = float(state["sampling_eps_max"])
    return out


def load_lightning(path: str | Path, weights: str | None = None):
    """A reference Lightning ``.ckpt`` as a :class:`SamplerCheckpoint` (native names): the EMA weights by default
    (``weights`` = "ema" | "raw"), mapped exactly as an HF folder is (``bd3_megatron.checkpoint.hf.from_hf``)."""
    from bd3_megatron.checkpoint.hf import from_hf

    where = str(path)
    ckpt = load_ckpt(path)
    use = weights or ("ema" if isinstance(ckpt.get("ema"), dict) else "raw")
    state = to_hf_state(ckpt, use, where)
    config = hf_config_from(ckpt, state, where)
    state = {k: v for k, v in state.items() if not (v.dim() == 0 and k.startswith("backbone."))}
    out = from_hf(config, state, where=where)
    out.source = {"kind": "bd3lms-lightning", "path": str(Path(path).resolve()), "weights": use}
    if "global_step" in ckpt:
        out.source["step"] = int(ckpt["global_step"])
    return out
