"""The BD3 language model, assembled from megatron-core parts.

    x_t ⊕ x0 --VocabParallelEmbedding--> [2L, b, h] --TransformerBlock(BD3 mask, shared RoPE)--> [2L, b, h]
        --keep noisy half [:L], select masked positions--> ColumnParallelLinear head --> vocab-parallel CE

The model knows nothing of DeepSpeed or Slurm. Tensor parallelism lives inside the megatron layers; pipeline
parallelism is expressed the megatron way (``pre_process``/``post_process`` stages, ``set_input_tensor``), and every
stage rebuilds the mask and the rotary table locally instead of receiving them.
"""
from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType, ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from bd3_megatron.diffusion import masks
from bd3_megatron.model.attention import BD3CoreAttention, is_block_mask


@dataclass(frozen=True)
class BD3Spec:
    """What the model needs to know beyond the transformer sizes."""

    vocab_size: int  # real vocabulary incl. the mask token
    mask_token_id: int
    seq_len: int  # L (the model sees 2L tokens)
    block_size: int  # L'
    attention_backend: str = "auto"  # auto | sdpa | flex
    vocab_multiple: int = 128
    mode: str = "bd3"  # bd3 (x_t ⊕ x0) | mdlm (x_t alone, bidirectional) | ar (x0 alone, causal, next token)


def padded_vocab_size(vocab_size: int, multiple: int, tp: int) -> int:
    """Vocabulary rounded up so every tensor-parallel rank holds an equal, aligned slice (Megatron convention)."""
    step = multiple * tp
    return int(math.ceil(vocab_size / step) * step)


def bd3_layer_spec():
    """megatron-core local GPT layer with the BD3 core attention and an arbitrary mask."""
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.arbitrary
    spec.submodules.self_attention.submodules.core_attention = BD3CoreAttention
    return spec


class SharedRotary(torch.nn.Module):
    """RoPE table indexed by explicit positions, so noisy token l and clean token l share position l."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        freqs = torch.outer(position_ids.to(self.inv_freq.device, torch.float32), self.inv_freq)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # [S, 1, 1, head_dim], rotate-half layout


class BD3Model(MegatronModule):
    """BD3-LM: a pre-LN transformer over x_t ⊕ x0 with the block-diffusion attention mask."""

    def __init__(self, config: TransformerConfig, spec: BD3Spec, pre_process: bool = True,
                 post_process: bool = True):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        if spec.seq_len % spec.block_size:
            raise ValueError(f"seq_len {spec.seq_len} is not a multiple of block_size {spec.block_size}")
        self.spec = spec
        self.pre_process = pre_process
        self.post_process = post_process
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.padded_vocab = padded_vocab_size(spec.vocab_size, spec.vocab_multiple, tp)
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.rotary = SharedRotary(head_dim)
        if pre_process:
            self.embedding = LanguageModelEmbedding(config, vocab_size=self.padded_vocab,
                                                    max_sequence_length=spec.seq_len, position_embedding_type="rope")
        self.decoder = TransformerBlock(config=config, spec=bd3_layer_spec(), pre_process=pre_process,
                                        post_process=post_process)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, self.padded_vocab, config=config, init_method=config.init_method, bias=False,
                skip_bias_add=False, gather_output=False)
            # SUBS: the mask token and the padding rows of the vocabulary are never predicted.
            part = self.padded_vocab // tp
            ids = torch.arange(part) + part * parallel_state.get_tensor_model_parallel_rank()
            never = (ids == spec.mask_token_id) | (ids >= spec.vocab_size)
            self.register_buffer("never_predict", never, persistent=False)
        self._masks: dict[tuple, Any] = {}

    # ---- pipeline plumbing (megatron schedules call this) ----
    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    # ---- masks ----
    def bd3_attention_mask(self, seq_len: int, device: torch.device):
        """The x_t ⊕ x mask for ``seq_len`` (cached per shape): flex BlockMask on CUDA, dense bool otherwise."""
        backend = self.spec.attention_backend
        if backend == "auto":
            backend = "flex" if device.type == "cuda" else "sdpa"
        key = (seq_len, backend, str(device))
        if key not in self._masks:
            if backend == "flex":
                self._masks[key] = masks.flex_block_mask(seq_len, self.spec.block_size, device)
            else:
                self._masks[key] = masks.bd3_mask(seq_len, self.spec.block_size, device=device)
        return self._masks[key]

    # ---- forward pieces ----
    def encode(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor, attention_mask) -> torch.Tensor:
        """Embed (first stage) and run this stage's layers. Returns hidden states [S, b, h]."""
        rotary = self.rotary(position_ids)
        hidden = self.embedding(input_ids, position_ids=None) if self.pre_process else None
        return self.decoder(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rotary)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits [N, V/tp] in fp32 with never-predicted ids at -inf."""
        logits, _ = self.output_layer(hidden)
        return logits.float().masked_fill(self.never_predict, float("-inf"))

    def head_cross_entropy(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [N] of ``labels`` under the SUBS-masked head, without gathering the vocab."""
        return tensor_parallel.vocab_parallel_cross_entropy(self.head_logits(hidden), labels)

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary [N, V] (gathered across TP), for sampling and evaluation."""
        logits = self.head_logits(hidden)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        return logits[..., : self.spec.vocab_size]

    def _stream_mask(self, seq_len: int, device: torch.device):
        """Attention mask of the input stream: the BD3 mask for x_t ⊕ x0, or for the baselines the slices of the
        same mask function: L'=L noisy half (MDLM, bidirectional) and the L'=1 clean half (AR, causal)."""
        if self.spec.mode == "bd3":
            return self.bd3_attention_mask(seq_len, device)
        key = (self.spec.mode, seq_len, str(device))
        if key not in self._masks:
            if self.spec.mode == "mdlm":
                self._masks[key] = masks.bd3_mask(seq_len, seq_len, device=device)[:seq_len, :seq_len]
            else:
                self._masks[key] = masks.block_causal_mask(seq_len, 1, device=device)
        return self._masks[key]

    def _padded_mask(self, mask, key_padding: torch.Tensor, seq_len: int, streams: int):
        """The stream mask with padding keys hidden from every query (each query still attends itself), per batch
        row. key_padding [b, L] marks a row's padding; both halves of x_t ⊕ x0 share it."""
        key_padding = key_padding.to(self.rotary.inv_freq.device).repeat(1, streams)
        if is_block_mask(mask):
            return masks.padded_flex_block_mask(seq_len, self.spec.block_size, key_padding)
        return masks.padded_dense(mask, key_padding)

    def _bd3_hidden(self, xt, x0, key_padding: torch.Tensor | None = None):
        """Hidden states of this stage and L. bd3 runs x_t ⊕ x0 (2L tokens, positions shared by both halves);
        mdlm runs x_t alone and ar x0 alone (L tokens). key_padding [b, L] (True at padding, optional) hides padding
        keys; without it the cached mask is used unchanged."""
        streams = 2 if self.spec.mode == "bd3" else 1
        if self.pre_process:
            seq_len = (x0 if x0 is not None else xt).shape[1]
        else:  # later pipeline stages infer L from the received activations [streams*L, b, h]
            seq_len = self.decoder.input_tensor.shape[0] // streams
        device = self.rotary.inv_freq.device
        positions = torch.arange(seq_len, device=device)
        ids = None
        if self.pre_process:
            ids = {"bd3": lambda: torch.cat([xt, x0], dim=1), "mdlm": lambda: xt, "ar": lambda: x0}[self.spec.mode]()
        positions = positions.repeat(streams)
        mask = self._stream_mask(seq_len, device)
        if key_padding is not None:
            mask = self._padded_mask(mask, key_padding, seq_len, streams)
        return self.encode(ids, positions, mask), seq_len

    def forward(self, xt: torch.Tensor | None, x0: torch.Tensor | None, loss_mask: torch.Tensor | None = None,
                key_padding: torch.Tensor | None = None):
        """Training/eval forward.

        Returns hidden states on non-last pipeline stages; on the last stage the per-token cross-entropy [b, L]
        (fp32) at ``loss_mask`` positions and 0 elsewhere: for bd3/mdlm the masked noisy tokens given the noisy
        stream, for ar token l given x0[<l] (read from the hidden state at l-1; position 0 has no prediction).
        ``key_padding`` [b, L] bool (True at padding of --pad rows; every pipeline stage gets it): no real token
        attends a padding position of either half, so padding values cannot change a real token's output.
        """
        hidden, seq_len = self._bd3_hidden(xt, x0, key_padding)
        if not self.post_process:
            return hidden
        out = hidden[:seq_len].transpose(0, 1)  # [b, L, h]; in bd3 the clean half feeds attention only
        if self.spec.mode == "ar":  # the state at l-1 predicts token l
            out = torch.cat([out[:, :1], out[:, :-1]], dim=1)
            loss_mask = loss_mask.clone()
            loss_mask[:, 0] = False
        ce = torch.zeros(loss_mask.shape, dtype=torch.float32, device=out.device)
        if loss_mask.any():
            ce = ce.masked_scatter(loss_mask, self.head_cross_entropy(out[loss_mask], x0[loss_mask]))
        return ce

    def block_logits(self, xt: torch.Tensor, x0: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Logits [b, end-start, V] of noisy positions [start, end) given x_t ⊕ x0 (single-stage models only)."""
        if not (self.pre_process and self.post_process):
            raise RuntimeError("block_logits needs the whole model on one stage (pipeline size 1)")
        if self.spec.mode != "bd3":
            raise RuntimeError(f"block sampling is for bd3 models, this one is {self.spec.mode}")
        hidden, seq_len = self._bd3_hidden(xt, x0)
        return self.full_logits(hidden[start:end].transpose(0, 1))


# ---- deterministic, layout-independent initialisation ----
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


def canonical_parameter_names(model: BD3Model) -> dict[str, str]:
    """Map local parameter names to layout-independent names (global layer index under pipeline parallelism)."""
    offsets = {str(i): layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    out = {}
    for name, _ in model.named_parameters():
        m = _LAYER_RE.match(name)
        out[name] = f"decoder.layers.{offsets[m.group(1)]}." + name[m.end():] if m else name
    return out


def full_shape(param: torch.Tensor) -> tuple[list[int], int | None]:
    """The unsharded shape of a (possibly tensor-parallel) parameter and its partition dim."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        dim = param.partition_dim
        shape[dim] *= parallel_state.get_tensor_model_parallel_world_size()
        return shape, dim
    return shape, None


def init_std(canonical_name: str, config: TransformerConfig) -> float | None:
    """Standard deviation for a weight, or None for constant-initialised tensors (norms, biases)."""
    if canonical_name.endswith(".bias"):
        return None
    if "layernorm" in canonical_name or "layer_norm" in canonical_name:
        return None
    if canonical_name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return config.init_method_std / math.sqrt(2.0 * config.num_layers)  # GPT-2 scaled residual init
    return config.init_method_std


@torch.no_grad()
def init_parameters(model: BD3Model, seed: int) -> None:
    """Initialise every parameter from a generator keyed by (seed, canonical name) on its full shape, then keep
    this rank's shard. Any TP/PP layout therefore starts from the same weights as the single-process run."""
    names = canonical_parameter_names(model)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for name, param in model.named_parameters():
        cname = names[name]
        std = init_std(cname, model.config)
        if std is None:
            param.fill_(0.0 if cname.endswith(".bias") else 1.0)
            continue
        shape, dim = full_shape(param)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(cname.encode())) % (2**63))
        full = torch.randn(shape, generator=gen, dtype=torch.float32) * std
        if dim is not None:
            full = full.chunk(parallel_state.get_tensor_model_parallel_world_size(), dim=dim)[tp_rank]
        param.copy_(full.to(param.dtype))


def build_transformer_config(*, num_layers: int, hidden_size: int, num_heads: int, ffn_hidden_size: int | None,
                             dropout: float, tp: int, pp: int, params_dtype=torch.float32,
                             pipeline_dtype=torch.float32, use_cpu_initialization: bool = True,
                             recompute: bool = False) -> TransformerConfig:
    """megatron-core TransformerConfig for the BD3 model: pre-LN, GELU(tanh) MLP, no linear biases, no fusions
    that need apex/TE (so CPU and GPU run the same math)."""
    return TransformerConfig(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_heads,
        ffn_hidden_size=ffn_hidden_size or 4 * hidden_size, hidden_dropout=dropout, attention_dropout=0.0,
        add_bias_linear=False, activation_func=lambda x: F.gelu(x, approximate="tanh"), normalization="LayerNorm",
        layernorm_epsilon=1e-5, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        params_dtype=params_dtype, pipeline_dtype=pipeline_dtype, use_cpu_initialization=use_cpu_initialization,
        perform_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, sequence_parallel=False,
        recompute_granularity="full" if recompute else None, recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )
