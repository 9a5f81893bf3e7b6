"""The reference's ``BD3LM`` Hugging Face layout (bd3lms ``models/hf``; spec §8), read and written.

Weights move both ways between this project and users of the published bd3lms checkpoints. Import
(:func:`from_hf`) maps every reference tensor to the reference-compatible layer (``model.arch=bd3lms``,
``bd3_megatron.model.adaln``): norms, attention, MLP and head weights and biases one to one; without time
conditioning (the reference zeroes sigma) each adaLN modulation W·silu(sigma_map(0)) + b is one constant vector,
computed once here and kept as the layer's ``modulation.bias``; with time conditioning the time embedding and adaLN
weights are kept as they are. A model whose modulation is the identity (scale 0, gate 1) with zero MLP/head biases
imports as the plain megatron layer (LayerNorm(w, b) = norm weight w, shift b). Missing or extra tensors, another
rotary table, causal or cross_attn=false models and non-finite values are refused by name. Export (:func:`to_hf`)
writes either architecture exactly (only concatenations and zeros, no arithmetic on a weight).

Safetensors and JSON only; nothing here executes code from a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bd3_megatron.checkpoint.sampler import (
    CONFIG_FILE,
    SamplerCheckpoint,
    _read_json,
    _read_weights,
    check_state,
    write_folder,
)
from bd3_megatron.model.rope import rope_inv_freq
from bd3_megatron.model.time_embedding import TIMESTEP_DIM
from bd3_megatron.modes import get_mode
from bd3_megatron.sampling.net import NetConfig

HF_COND_DIM = 128  # cond_dim of the published bd3lms models; exports without time conditioning write zero adaLN weights
HF_TIMESTEP_DIM = TIMESTEP_DIM  # the reference TimestepEmbedder's sinusoid width (sigma_map.mlp.0 input)
# The reference's vocabulary conventions (spec §3): vocab size -> (tokenizer, mask id)
HF_KNOWN_VOCABS = {50258: ("gpt2", 50257), 30522: ("bert-base-uncased", 103)}


# ---------------------------------------------------------------------------------------------- HF (bd3lms) layout
# The tensors that map one to one between the reference (HF) names and this project's arch bd3lms names, read in both
# directions by to_hf and _bd3lms_form: per layer as suffixes of "backbone.blocks.{i}." <-> "decoder.layers.{i}.",
# then the final layer; the embedding is one pair. QKV row order, the adaLN modulations and the time embedding differ
# per direction and are mapped next to the table's use.
_HF_EMBEDDING = ("backbone.vocab_embed.embedding", "embedding.word_embeddings.weight")
_HF_LAYER_NAMES = (
    ("norm1.weight", "input_layernorm.weight"),
    ("attn_qkv.weight", "self_attention.linear_qkv.weight"),  # rows reordered: _qkv_to_hf / _qkv_from_hf
    ("attn_out.weight", "self_attention.linear_proj.weight"),
    ("norm2.weight", "pre_mlp_layernorm.weight"),
    ("mlp.0.weight", "mlp.linear_fc1.weight"),
    ("mlp.0.bias", "mlp.linear_fc1.bias"),
    ("mlp.2.weight", "mlp.linear_fc2.weight"),
    ("mlp.2.bias", "mlp.linear_fc2.bias"),
)
_HF_FINAL_NAMES = (
    ("backbone.output_layer.norm_final.weight", "decoder.final_layernorm.weight"),
    ("backbone.output_layer.linear.weight", "output_layer.weight"),
    ("backbone.output_layer.linear.bias", "output_layer.bias"),
)


def _hf_layer_prefixes(i: int) -> tuple[str, str]:
    """(reference, native) name prefix of layer ``i``."""
    return f"backbone.blocks.{i}.", f"decoder.layers.{i}."


def _qkv_to_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """megatron rows per head [q_j | k_j | v_j] -> reference rows [all q | all k | all v] (head-major inside)."""
    three_h, h = w.shape
    return w.view(heads, 3, three_h // (3 * heads), h).transpose(0, 1).reshape(three_h, h)


def _qkv_from_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    three_h, h = w.shape
    return w.view(3, heads, three_h // (3 * heads), h).transpose(0, 1).reshape(three_h, h)


def hf_expected_shapes(
    n_layers: int, hidden: int, vocab: int, cond: int, adaln: bool = True, var_min: bool = True
) -> dict[str, tuple[int, ...]]:
    """The reference BD3LM state dict (spec §8) for these sizes."""
    h, f = hidden, 4 * hidden
    out: dict[str, tuple[int, ...]] = {"backbone.vocab_embed.embedding": (vocab, h)}
    if adaln:
        out.update(
            {
                "backbone.sigma_map.mlp.0.weight": (cond, HF_TIMESTEP_DIM),
                "backbone.sigma_map.mlp.0.bias": (cond,),
                "backbone.sigma_map.mlp.2.weight": (cond, cond),
                "backbone.sigma_map.mlp.2.bias": (cond,),
            }
        )
    for i in range(n_layers):
        p = f"backbone.blocks.{i}."
        out.update(
            {
                p + "norm1.weight": (h,),
                p + "attn_qkv.weight": (3 * h, h),
                p + "attn_out.weight": (h, h),
                p + "norm2.weight": (h,),
                p + "mlp.0.weight": (f, h),
                p + "mlp.0.bias": (f,),
                p + "mlp.2.weight": (h, f),
                p + "mlp.2.bias": (h,),
            }
        )
        if adaln:
            out.update({p + "adaLN_modulation.weight": (6 * h, cond), p + "adaLN_modulation.bias": (6 * h,)})
    out.update(
        {
            "backbone.output_layer.norm_final.weight": (h,),
            "backbone.output_layer.linear.weight": (vocab, h),
            "backbone.output_layer.linear.bias": (vocab,),
        }
    )
    if adaln:
        out.update(
            {
                "backbone.output_layer.adaLN_modulation.weight": (2 * h, cond),
                "backbone.output_layer.adaLN_modulation.bias": (2 * h,),
            }
        )
    if var_min:
        out.update({"sampling_eps_min": (), "sampling_eps_max": ()})
    return out


def to_hf(ckpt: SamplerCheckpoint) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json dict, state dict) in the reference BD3LM layout; exact (no arithmetic on any weight)."""
    cfg, s = ckpt.config, ckpt.state
    h, heads, cond = cfg.hidden_size, cfg.num_heads, HF_COND_DIM
    if not get_mode(cfg.mode).block_sampler:
        raise ValueError(
            f"the bd3lm HF layout holds block diffusion models; this is a model.mode={cfg.mode} "
            f"checkpoint (use --format native)"
        )
    if cfg.ffn_hidden_size != 4 * h:
        raise ValueError(
            f"the reference BD3LM has a 4x MLP; this model has ffn_hidden_size {cfg.ffn_hidden_size} "
            f"for hidden {h}, so it has no HF bd3lm form (use --format native)"
        )
    if cfg.rope_base != 10000.0 or cfg.layernorm_eps != 1e-5:
        raise ValueError(
            "the reference BD3LM fixes rope base 10000 and LayerNorm eps 1e-5; this model differs (use --format native)"
        )
    f32 = dict(dtype=torch.float32)
    b = _as_bd3lms(cfg, s)
    tc = cfg.time_conditioning
    cond = cfg.cond_dim if tc else HF_COND_DIM
    out: dict[str, torch.Tensor] = {
        _HF_EMBEDDING[0]: s[_HF_EMBEDDING[1]],
        "backbone.rotary_emb.inv_freq": rope_inv_freq(cfg.head_dim),
    }
    for j, shape in ((0, (cond, HF_TIMESTEP_DIM)), (2, (cond, cond))):
        # without time conditioning the modulation is W·c + b with W = 0: the time embedding is inert (zeros)
        out[f"backbone.sigma_map.mlp.{j}.weight"] = b[f"time_embedding.mlp.{j}.weight"] if tc else torch.zeros(shape)
        out[f"backbone.sigma_map.mlp.{j}.bias"] = b[f"time_embedding.mlp.{j}.bias"] if tc else torch.zeros(cond)

    def adaln(dest: str, src: str, chunks: int) -> None:
        out[dest + ".weight"] = b[src + ".weight"] if tc else torch.zeros(chunks * h, cond, **f32)
        out[dest + ".bias"] = b[src + ".bias"]  # chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp

    for i in range(cfg.num_layers):
        q, p = _hf_layer_prefixes(i)
        out.update({q + ref: b[p + ours] for ref, ours in _HF_LAYER_NAMES})
        out[q + "attn_qkv.weight"] = _qkv_to_hf(out[q + "attn_qkv.weight"], heads)
        adaln(q + "adaLN_modulation", p + "modulation", 6)
    adaln("backbone.output_layer.adaLN_modulation", "decoder.final_layernorm.modulation", 2)
    out.update({ref: b[ours] for ref, ours in _HF_FINAL_NAMES})
    out.update(
        {
            "sampling_eps_min": torch.tensor(float(ckpt.clip_window[0]), **f32),
            "sampling_eps_max": torch.tensor(float(ckpt.clip_window[1]), **f32),
        }
    )
    # Run values come from the checkpoint's config; the rest describe the tensors written above (cross_attn, adaln
    # with cond_dim-wide zero weights, no causal mask or time conditioning, the clip-window buffers), and
    # attn_backend is the one the reference HF module samples with (it asserts sdpa in sample mode).
    config = {
        "model_type": "bd3lm",
        "architectures": ["BD3LM"],
        "return_dict": False,
        "block_size": cfg.block_size,
        "vocab_size": cfg.vocab_size,
        "model_length": cfg.seq_len,
        "cross_attn": True,
        "adaln": True,
        "attn_backend": "sdpa",
        "causal": False,
        "hidden_dim": h,
        "cond_dim": cond,
        "n_blocks": cfg.num_layers,
        "n_heads": heads,
        "time_conditioning": tc,
        "var_min": True,
        "sampling_eps_min": float(ckpt.clip_window[0]),
        "sampling_eps_max": float(ckpt.clip_window[1]),
        # read back by load_hf; the reference config ignores unknown keys
        "bd3_megatron": {"mask_token_id": cfg.mask_token_id, "tokenizer": ckpt.tokenizer, "source": ckpt.source},
    }
    if cfg.dropout is not None:  # unknown (an old sampler folder): left out rather than invented
        config["dropout"] = float(cfg.dropout)
    return config, out


def _as_bd3lms(cfg: NetConfig, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native weights as the arch bd3lms (reference DiT block) tensors: arch bd3lms as is; the megatron layer's
    LayerNorm(w, b) as weight w with the constant modulation (shift b, scale 0, gate 1), zero MLP and head biases."""
    if cfg.arch == "bd3lms":
        return s
    h = cfg.hidden_size
    zeros, ones = torch.zeros(h), torch.ones(h)
    out = {"embedding.word_embeddings.weight": s["embedding.word_embeddings.weight"]}
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        ln1_b, ln2_b = s[p + "input_layernorm.bias"].float(), s[p + "pre_mlp_layernorm.bias"].float()
        out.update({p + k: s[p + k] for k in _SHARED_LAYER_TENSORS})
        out.update(
            {
                p + "mlp.linear_fc1.bias": torch.zeros(cfg.ffn_hidden_size),
                p + "mlp.linear_fc2.bias": torch.zeros(h),
                p + "modulation.bias": torch.cat([ln1_b, zeros, ones, ln2_b, zeros, ones]),
            }
        )
    out.update(
        {
            "decoder.final_layernorm.weight": s["decoder.final_layernorm.weight"],
            "decoder.final_layernorm.modulation.bias": torch.cat([s["decoder.final_layernorm.bias"].float(), zeros]),
            "output_layer.weight": s["output_layer.weight"],
            "output_layer.bias": torch.zeros(cfg.vocab_size),
        }
    )
    return out


_SHARED_LAYER_TENSORS = (
    "input_layernorm.weight",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_proj.weight",
    "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
)


def save_hf(ckpt: SamplerCheckpoint, out: str | Path) -> Path:
    check_state(ckpt.config, ckpt.state)
    config, state = to_hf(ckpt)
    return write_folder(out, config, state)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def from_hf(config: dict[str, Any], state: dict[str, torch.Tensor], where: str = "the HF folder") -> SamplerCheckpoint:
    """Native weights (a SamplerCheckpoint: arch megatron when exactly representable, else bd3lms) from the
    reference layout ``config`` (config.json) + ``state`` (backbone.* tensors, optional clip-window buffers), or
    ValueError naming the first tensor/field with no exact counterpart."""
    for key in ("vocab_size", "model_length", "block_size", "hidden_dim", "n_blocks", "n_heads"):
        _require(key in config, f"{where}: config.json lacks '{key}'")
    _require(config.get("cross_attn", True), f"{where}: cross_attn=false is an MDLM model, not BD3-LM")
    _require(not config.get("causal", False), f"{where}: causal=true is the AR baseline, not BD3-LM")
    adaln = bool(config.get("adaln", True))
    time_cond = bool(config.get("time_conditioning", False)) and adaln
    h, n, heads, vocab = (int(config[k]) for k in ("hidden_dim", "n_blocks", "n_heads", "vocab_size"))
    cond = int(config.get("cond_dim", HF_COND_DIM))
    want = hf_expected_shapes(n, h, vocab, cond, adaln=adaln, var_min=False)
    want["backbone.rotary_emb.inv_freq"] = (h // heads // 2,)
    optional = {"sampling_eps_min", "sampling_eps_max"}
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want) - optional)
    _require(
        not missing,
        f"{where}: {len(missing)} tensors missing (e.g. {missing[:3]}); the folder is truncated "
        f"or not a BD3LM checkpoint",
    )
    _require(not extra, f"{where}: tensors with no counterpart in this model: {extra[:5]}")
    for name, shape in want.items():
        _require(
            tuple(state[name].shape) == shape,
            f"{where}: {name} has shape {tuple(state[name].shape)}, the config implies {shape}",
        )
        _require(state[name].is_floating_point(), f"{where}: {name} has dtype {state[name].dtype}, not floating point")
    s = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    _require(
        torch.allclose(s["backbone.rotary_emb.inv_freq"], rope_inv_freq(h // heads), rtol=1e-6, atol=0),
        f"{where}: backbone.rotary_emb.inv_freq is not the base-10000 table this model uses",
    )
    bd3lms = _bd3lms_form(s, n, h, adaln, time_cond)
    out = None if time_cond else _megatron_form(bd3lms, n, h)
    arch = "megatron" if out is not None else "bd3lms"
    out = bd3lms if out is None else out
    for name, t in out.items():
        _require(bool(torch.isfinite(t).all()), f"{where}: {name} holds non-finite values; the weights are damaged")
    for i in range(n):  # the layout change of the fused QKV rows (reference: all q | all k | all v)
        key = f"decoder.layers.{i}.self_attention.linear_qkv.weight"
        out[key] = _qkv_from_hf(out[key], heads)

    extra_cfg = config.get("bd3_megatron") or {}
    tokenizer = extra_cfg.get("tokenizer")
    mask_id = extra_cfg.get("mask_token_id")
    if mask_id is None:
        _require(
            vocab in HF_KNOWN_VOCABS,
            f"{where}: vocab_size {vocab} matches neither reference vocabulary "
            f"({', '.join(map(str, HF_KNOWN_VOCABS))}); the mask id is unknown",
        )
        tokenizer, mask_id = HF_KNOWN_VOCABS[vocab]
    eps = tuple(_clip_value(config, s, k, d) for k, d in (("sampling_eps_min", 1e-3), ("sampling_eps_max", 1.0)))
    net_cfg = NetConfig(
        num_layers=n,
        hidden_size=h,
        num_heads=heads,
        ffn_hidden_size=4 * h,
        vocab_size=vocab,
        mask_token_id=int(mask_id),
        seq_len=int(config["model_length"]),
        block_size=int(config["block_size"]),
        dropout=float(config["dropout"]) if config.get("dropout") is not None else None,
        arch=arch,
        time_conditioning=time_cond,
        cond_dim=cond if time_cond else 0,
    )
    notes = []
    if arch == "megatron" and adaln:
        notes.append(
            "the adaLN modulation is the identity (scale 0, gate 1, zero weights) and the MLP/head biases are zero: "
            "imported exactly as the plain megatron layer (model.arch=megatron); sigma_map.* unused"
        )
    elif adaln and not time_cond:
        notes.append(
            "time_conditioning=false: each adaLN modulation is the constant W·silu(sigma_map(0)) + b, stored as "
            "its modulation.bias (model.arch=bd3lms); sigma_map.* and adaLN weights are folded into it"
        )
    source = dict(extra_cfg.get("source") or {}, imported_from="hf")
    return SamplerCheckpoint(net_cfg, out, tokenizer=tokenizer, clip_window=eps, source=source, notes=notes)


def _bd3lms_form(s: dict[str, torch.Tensor], n: int, h: int, adaln: bool, time_cond: bool) -> dict[str, torch.Tensor]:
    """Reference tensors -> arch bd3lms canonical names (QKV rows still in the reference order).

    Without time conditioning the reference zeroes sigma, so c₀ = silu(sigma_map(0)) is one vector and each adaLN
    modulation ``W·c₀ + b`` a constant, computed here with the reference's operations in float64 and rounded once
    (deterministic bits; within an fp32 rounding of what the reference computes each forward). Without adaLN
    (``adaln=false``) the block is unmodulated: shift 0, scale 0, gate 1, which the modulated form computes exactly."""
    out = {_HF_EMBEDDING[1]: s[_HF_EMBEDDING[0]]}
    c0 = None
    if adaln and not time_cond:  # in float64, rounded once to fp32: the same bits whatever the BLAS kernel path
        d = {k: v.double() for k, v in s.items() if "sigma_map" in k}
        t_freq = torch.cat([torch.ones(1, HF_TIMESTEP_DIM // 2), torch.zeros(1, HF_TIMESTEP_DIM // 2)], dim=-1).double()
        hidden = F.silu(F.linear(t_freq, d["backbone.sigma_map.mlp.0.weight"], d["backbone.sigma_map.mlp.0.bias"]))
        c0 = F.silu(F.linear(hidden, d["backbone.sigma_map.mlp.2.weight"], d["backbone.sigma_map.mlp.2.bias"]))
    if time_cond:
        for j in (0, 2):
            for kind in ("weight", "bias"):
                out[f"time_embedding.mlp.{j}.{kind}"] = s[f"backbone.sigma_map.mlp.{j}.{kind}"]

    def modulation(name: str, dest: str, chunks: int) -> None:
        if not adaln:
            identity = torch.cat([torch.zeros(h), torch.zeros(h), torch.ones(h)])
            out[dest + ".bias"] = identity.repeat(2) if chunks == 6 else torch.zeros(2 * h)
        elif time_cond:
            out[dest + ".weight"], out[dest + ".bias"] = s[name + ".weight"], s[name + ".bias"]
        else:
            out[dest + ".bias"] = F.linear(c0, s[name + ".weight"].double(), s[name + ".bias"].double())[0].float()

    for i in range(n):
        q, p = _hf_layer_prefixes(i)
        out.update({p + ours: s[q + ref] for ref, ours in _HF_LAYER_NAMES})
        modulation(q + "adaLN_modulation", p + "modulation", 6)
    modulation("backbone.output_layer.adaLN_modulation", "decoder.final_layernorm.modulation", 2)
    out.update({ours: s[ref] for ref, ours in _HF_FINAL_NAMES})
    return out


def _megatron_form(b: dict[str, torch.Tensor], n: int, h: int) -> dict[str, torch.Tensor] | None:
    """The plain megatron layer's weights when the constant-modulation model is exactly one (scale 0, gate 1, zero
    MLP and head biases: LayerNorm(w, b) = weight w, shift b), else None."""

    def zero(t: torch.Tensor) -> bool:
        return not bool(torch.any(t != 0))

    out = {"embedding.word_embeddings.weight": b["embedding.word_embeddings.weight"]}
    for i in range(n):
        p = f"decoder.layers.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = b[p + "modulation.bias"].chunk(6)
        if not (zero(scale1) and zero(scale2) and bool(torch.all(gate1 == 1)) and bool(torch.all(gate2 == 1))):
            return None
        if not (zero(b[p + "mlp.linear_fc1.bias"]) and zero(b[p + "mlp.linear_fc2.bias"])):
            return None
        out.update(
            {
                p + "input_layernorm.weight": b[p + "input_layernorm.weight"],
                p + "input_layernorm.bias": shift1.clone(),
                p + "self_attention.linear_qkv.weight": b[p + "self_attention.linear_qkv.weight"],
                p + "self_attention.linear_proj.weight": b[p + "self_attention.linear_proj.weight"],
                p + "pre_mlp_layernorm.weight": b[p + "pre_mlp_layernorm.weight"],
                p + "pre_mlp_layernorm.bias": shift2.clone(),
                p + "mlp.linear_fc1.weight": b[p + "mlp.linear_fc1.weight"],
                p + "mlp.linear_fc2.weight": b[p + "mlp.linear_fc2.weight"],
            }
        )
    shift, scale = b["decoder.final_layernorm.modulation.bias"].chunk(2)
    if not (zero(scale) and zero(b["output_layer.bias"])):
        return None
    out.update(
        {
            "decoder.final_layernorm.weight": b["decoder.final_layernorm.weight"],
            "decoder.final_layernorm.bias": shift.clone(),
            "output_layer.weight": b["output_layer.weight"],
        }
    )
    return out


def _clip_value(config: dict[str, Any], state: dict[str, torch.Tensor], key: str, default: float) -> float:
    """The learned window lives in the 0-d fp32 buffer; config.json's value is used when it is the same number
    at full precision (so a round trip keeps e.g. 0.2 rather than 0.20000000298)."""
    cfg_value = float(config.get(key, default))
    if key not in state:
        return cfg_value
    buf = state[key].float()
    return cfg_value if torch.tensor(cfg_value, dtype=torch.float32) == buf else float(buf)


def load_hf(folder: str | Path) -> SamplerCheckpoint:
    folder = Path(folder)
    config = _read_json(folder / CONFIG_FILE)
    return from_hf(config, _read_weights(folder), where=str(folder))
