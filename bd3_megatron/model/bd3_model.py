"""The BD3 language model, assembled from megatron-core parts.

    x_t ⊕ x0 --VocabParallelEmbedding--> [2L, b, h] --TransformerBlock(BD3 mask, shared RoPE)--> [2L, b, h]
        --keep noisy half [:L], select masked positions--> ColumnParallelLinear head --> vocab-parallel CE

Shape legend (megatron-core's convention): b micro-batch size, L sequence length, L' block size, S = streams·L
tokens the backbone reads (2L for x_t ⊕ x0; L for the mdlm and ar modes), h hidden size, V vocabulary (V/tp per
tensor-parallel rank), N predicted positions of the micro-batch. Hidden states are sequence-first [S, b, h].
The model mode (``bd3_megatron.modes``) picks the input stream, the mask and where the head reads.

The model knows nothing of DeepSpeed or Slurm. Tensor parallelism lives inside the megatron layers; pipeline
parallelism is expressed the megatron way (``pre_process``/``post_process`` stages, ``set_input_tensor``), and every
stage rebuilds the mask and the rotary table locally instead of receiving them.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType, ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    LayerNormImpl,
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from bd3_megatron.diffusion import masks
from bd3_megatron.diffusion.loss import never_predicted
from bd3_megatron.model.adaln import adaln_final_norm_spec, adaln_layer_spec
from bd3_megatron.model.attention import BD3CoreAttention, is_block_mask
from bd3_megatron.model.head import linear_cross_entropy
from bd3_megatron.model.rope import rope_angles, rope_inv_freq
from bd3_megatron.model.time_embedding import TimeEmbedding
from bd3_megatron.modes import get_mode


@dataclass(frozen=True)
class BD3Spec:
    """What the model needs to know beyond the transformer sizes."""

    vocab_size: int  # real vocabulary incl. the mask token
    mask_token_id: int
    seq_len: int  # L (the model sees 2L tokens)
    block_size: int  # L'
    attention_backend: str = "auto"  # auto | sdpa | flex
    vocab_multiple: int = 128
    mode: str = "bd3"  # a registered model mode (bd3_megatron.modes): its input stream, mask and head inputs
    ce_chunk_tokens: int = 0  # tokens per chunk of the fused head + cross-entropy (0: a 32 MiB logit budget)
    noisy_half_last_layer: bool = True  # bd3: the last layer computes the noisy half only (the head's input)
    recompute: bool = False  # activation recomputation of every layer in backward (model.recompute)
    arch: str = "megatron"  # megatron (pre-LN GPT layer) | bd3lms (the reference DiT block: adaLN + biases)
    cond_dim: int = 0  # > 0: time-conditioned (arch bd3lms; SEDD): adaLN modulation from c = TimeEmbedding(sigma)


def padded_vocab_size(vocab_size: int, multiple: int, tp: int) -> int:
    """Vocabulary rounded up so every tensor-parallel rank holds an equal, aligned slice (Megatron convention)."""
    step = multiple * tp
    return int(math.ceil(vocab_size / step) * step)


def bd3_layer_spec(noisy_queries_only: bool = False) -> ModuleSpec:
    """megatron-core local GPT layer with the BD3 core attention and an arbitrary mask, as a
    :class:`BD3TransformerLayer`; with ``noisy_queries_only`` the layer class that computes outputs for the noisy
    half alone (the model's last layer)."""
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.arbitrary
    spec.submodules.self_attention.submodules.core_attention = BD3CoreAttention
    spec.module = NoisyHalfTransformerLayer if noisy_queries_only else BD3TransformerLayer
    return spec


def bd3_block_spec(config: TransformerConfig, spec: BD3Spec, post_process: bool) -> TransformerBlockSubmodules:
    """This pipeline stage's layers. For a mode whose head reads the noisy half alone (bd3) the model's last layer
    (last stage only) is a :class:`NoisyHalfTransformerLayer` unless ``spec.noisy_half_last_layer`` is off: nothing
    reads the clean half of its output."""
    layers = get_num_layers_to_build(config)
    noisy_half = get_mode(spec.mode).noisy_half_last_layer and spec.noisy_half_last_layer
    last_noisy_only = noisy_half and post_process and layers > 0
    if spec.arch == "bd3lms":  # the reference DiT block (model/adaln.py), time-conditioned when cond_dim > 0
        layer_spec = partial(adaln_layer_spec, cond_dim=spec.cond_dim)
        final_norm = adaln_final_norm_spec(spec.cond_dim)
    else:  # megatron's GPT layer
        layer_spec, final_norm = bd3_layer_spec, LayerNormImpl
    specs = [layer_spec() for _ in range(layers - last_noisy_only)]
    specs += [layer_spec(noisy_queries_only=True)] * last_noisy_only
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)


class BD3TransformerLayer(TransformerLayer):
    """megatron-core's TransformerLayer with optional activation recomputation (``recompute``, set by the model).

    Recomputation is torch's non-reentrant checkpoint around the whole layer, not megatron's CheckpointFunction:
    that one hands its arguments to ``save_for_backward``, which refuses the flex BlockMask the layers receive on
    CUDA. Dropout draws are replayed (the checkpoint restores the CPU and CUDA RNG states); the BD3 model has no
    dropout inside tensor-parallel regions, whose RNG tracker megatron's own recompute would also restore."""

    recompute = False

    def forward(self, *args, **kwargs):
        if self.recompute and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)


class NoisyHalfTransformerLayer(BD3TransformerLayer):
    """A pre-LN transformer layer over x_t ⊕ x [2L, b, h] that returns the noisy half only [L, b, h].

    The head reads the last layer's output at noisy positions alone, so the clean half's queries, its output
    projection rows and its MLP rows would be computed for nothing: here K/V come from all 2L tokens (the noisy
    block attends clean blocks < b), queries from the first L rows (the core attention slices them, and the mask's
    noisy rows). Same parameters and, on the noisy half, the same outputs as :class:`TransformerLayer`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.self_attention.core_attention.noisy_queries_only = True

    def _forward_attention(self, hidden_states, attention_mask=None, rotary_pos_emb=None, **unused):
        ignored = {k: v for k, v in unused.items() if v is not None}
        if ignored:
            raise NotImplementedError(f"NoisyHalfTransformerLayer does not take {sorted(ignored)}")
        residual = hidden_states[: hidden_states.shape[0] // 2]
        attention_output_with_bias = self.self_attention(
            self.input_layernorm(hidden_states), attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb
        )
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                attention_output_with_bias, residual, self.hidden_dropout
            )
        return hidden_states, None


class SharedRotary(torch.nn.Module):
    """RoPE table indexed by explicit positions, so noisy token l and clean token l share position l."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, base), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return rope_angles(position_ids, self.inv_freq)[:, None, None, :]  # [S, 1, 1, head_dim]


class HeadOutput(NamedTuple):
    ce: torch.Tensor  # [b, L] or [N] fp32 per-token cross-entropy, no gradient
    nelbo_sum: torch.Tensor  # [] fp32, Σ loss_weight·ce, differentiable (0 without loss weights)


class SUBSOutputLayer(tensor_parallel.ColumnParallelLinear):
    """The vocab-parallel output head [h -> V_padded/tp] under SUBS: the mask token and the vocabulary padding are
    never predicted. A module (not a bare weight) so that engines which hook module calls (ZeRO-3) see its use.

    forward(hidden [N, h]) -> logits [N, V/tp] fp32 with never-predicted ids at -inf (sampling, evaluation);
    forward(hidden [N, h], labels [N], loss_weight [N] | None) -> HeadOutput([N] ce, [] weighted sum), computed
    by the fused chunked :func:`bd3_megatron.model.head.linear_cross_entropy` (no [N, V] logits kept); with
    ``log_expm1_sigma`` [N] the per-token value is SEDD's score entropy instead of the cross-entropy."""

    def __init__(self, config: TransformerConfig, padded_vocab: int, spec: BD3Spec):
        super().__init__(
            config.hidden_size,
            padded_vocab,
            config=config,
            init_method=config.init_method,
            bias=config.add_bias_linear,  # arch bd3lms: the reference head has a bias
            skip_bias_add=False,
            gather_output=False,
        )
        tp = parallel_state.get_tensor_model_parallel_world_size()
        part = padded_vocab // tp
        self.vocab_start = part * parallel_state.get_tensor_model_parallel_rank()
        ids = torch.arange(part) + self.vocab_start
        never = never_predicted(ids, spec.mask_token_id, spec.vocab_size)
        self.register_buffer("never_predict", never.nonzero().flatten(), persistent=False)  # [K] local column ids
        self.chunk_tokens = spec.ce_chunk_tokens
        self.real_tokens = spec.vocab_size - 1  # V - 1: SEDD's uniform score normaliser (the mask token is no y)
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_weight: torch.Tensor | None = None,
        log_expm1_sigma: torch.Tensor | None = None,
    ):
        if labels is None:
            logits, _ = super().forward(hidden)
            return logits.float().index_fill(-1, self.never_predict, float("-inf"))
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)  # gradient all-reduced over TP
        ce, nelbo_sum = linear_cross_entropy(
            hidden,
            self.weight,
            labels,
            self.never_predict,
            bias=self.bias,
            loss_weight=loss_weight,
            vocab_start=self.vocab_start,
            chunk_tokens=self.chunk_tokens,
            group=self.tp_group,
            log_expm1_sigma=log_expm1_sigma,
            real_tokens=self.real_tokens,
        )
        return HeadOutput(ce, nelbo_sum)


class BD3Model(MegatronModule):
    """BD3-LM: a pre-LN transformer over x_t ⊕ x0 with the block-diffusion attention mask."""

    def __init__(self, config: TransformerConfig, spec: BD3Spec, pre_process: bool = True, post_process: bool = True):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        if spec.seq_len % spec.block_size:
            raise ValueError(f"seq_len {spec.seq_len} is not a multiple of block_size {spec.block_size}")
        self.spec = spec
        self.mode = get_mode(spec.mode)
        self.pre_process = pre_process
        self.post_process = post_process
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.padded_vocab = padded_vocab_size(spec.vocab_size, spec.vocab_multiple, tp)
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.rotary = SharedRotary(head_dim)
        if spec.cond_dim:  # every stage conditions its layers on sigma: the embedder is replicated over the pipeline
            if spec.arch != "bd3lms":
                raise ValueError("time conditioning (cond_dim > 0) needs arch bd3lms (the adaLN layers)")
            self.time_embedding = TimeEmbedding(spec.cond_dim, dtype=config.params_dtype)
            mark_pipeline_replicated(self.time_embedding)
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config, vocab_size=self.padded_vocab, max_sequence_length=spec.seq_len, position_embedding_type="rope"
            )
        self.decoder = TransformerBlock(
            config=config,
            spec=bd3_block_spec(config, spec, post_process),
            pre_process=pre_process,
            post_process=post_process,
        )
        for layer in self.decoder.layers:
            layer.recompute = spec.recompute
        if post_process:
            self.output_layer = SUBSOutputLayer(config, self.padded_vocab, spec)
        self._masks: dict[tuple, Any] = {}

    # ---- pipeline plumbing (megatron schedules call this) ----
    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    # ---- masks ----
    def attention_mask(self, seq_len: int, device: torch.device):
        """The mode's attention mask for ``seq_len`` (cached per shape): for bd3 the x_t ⊕ x mask as a flex BlockMask
        on CUDA and dense bool otherwise (``attention_backend``); the baselines' dense slices of it."""
        backend = self.spec.attention_backend
        if backend == "auto":
            backend = "flex" if device.type == "cuda" else "sdpa"
        key = (seq_len, backend, str(device))
        if key not in self._masks:
            self._masks[key] = self.mode.attention_mask(seq_len, self.spec.block_size, backend, device)
        return self._masks[key]

    # ---- forward pieces ----
    def encode(
        self, input_ids: torch.Tensor | None, position_ids: torch.Tensor, attention_mask, sigma=None
    ) -> torch.Tensor:
        """Embed (first stage) and run this stage's layers, conditioned on the total noise ``sigma`` [b] when the
        model is time-conditioned. Returns hidden states [S, b, h]."""
        rotary = self.rotary(position_ids)
        hidden = self.embedding(input_ids, position_ids=None) if self.pre_process else None
        c = self.condition(sigma)
        if c is not None and self.decoder.final_layernorm is not None:
            self.decoder.final_layernorm.context = c  # megatron calls the final norm without the block's context
        return self.decoder(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rotary, context=c)

    def condition(self, sigma: torch.Tensor | None) -> torch.Tensor | None:
        """The adaLN conditioning vector c [b, cond] of a time-conditioned model (None otherwise). Raises ValueError
        when such a model gets no sigma."""
        if not self.spec.cond_dim:
            return None
        if sigma is None:
            raise ValueError(f"model.mode={self.spec.mode} is time-conditioned: the forward needs sigma [b]")
        return self.time_embedding(sigma)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits [N, V/tp] in fp32 with never-predicted ids at -inf."""
        return self.output_layer(hidden)

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary [N, V] (gathered across TP), for sampling and evaluation."""
        logits = self.head_logits(hidden)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        return logits[..., : self.spec.vocab_size]

    def _padded_mask(self, mask, key_padding: torch.Tensor, seq_len: int, streams: int):
        """The stream mask with padding keys hidden from every query (each query still attends itself), per batch
        row. key_padding [b, L] marks a row's padding; both halves of x_t ⊕ x0 share it."""
        key_padding = key_padding.to(self.rotary.inv_freq.device).repeat(1, streams)
        if is_block_mask(mask):
            return masks.padded_flex_block_mask(seq_len, self.spec.block_size, key_padding)
        return masks.padded_dense(mask, key_padding)

    def _stream_hidden(self, xt, x0, key_padding: torch.Tensor | None = None, sigma: torch.Tensor | None = None):
        """Hidden states [streams·L, b, h] of this stage, and L. The mode picks the input stream: x_t ⊕ x0 for bd3
        (2L tokens, positions shared by both halves), x_t for mdlm, x0 for ar. key_padding [b, L] (True at padding,
        optional) hides padding keys; without it the cached mask is used unchanged."""
        streams = self.mode.streams
        if self.pre_process:
            seq_len = (x0 if x0 is not None else xt).shape[1]
        else:  # later pipeline stages infer L from the received activations [streams*L, b, h]
            seq_len = self.decoder.input_tensor.shape[0] // streams
        device = self.rotary.inv_freq.device
        positions = torch.arange(seq_len, device=device)
        ids = self.mode.input_ids(xt, x0) if self.pre_process else None
        positions = positions.repeat(streams)
        mask = self.attention_mask(seq_len, device)
        if key_padding is not None:
            mask = self._padded_mask(mask, key_padding, seq_len, streams)
        return self.encode(ids, positions, mask, sigma), seq_len

    def forward(
        self,
        xt: torch.Tensor | None,
        x0: torch.Tensor | None,
        loss_mask: torch.Tensor | None = None,
        loss_weight: torch.Tensor | None = None,
        key_padding: torch.Tensor | None = None,
        sigma: torch.Tensor | None = None,
    ):
        """Training/eval forward.

        xt, x0: [b, L] token ids (first stage; ``None`` on later stages); loss_mask: [b, L] bool, the positions
        predicted; loss_weight: [b, L] fp32 per-token NELBO weight (0 off the mask) or None; key_padding: [b, L]
        bool, True at padding of --pad rows (every pipeline stage gets it): no real token attends a padding position
        of either half, so padding values cannot change a real token's output; sigma: [b] fp32 total noise of each
        sequence, for time-conditioned modes (sedd) on every pipeline stage, else None.

        Returns hidden states [S, b, h] on non-last pipeline stages; on the last stage a :class:`HeadOutput`: the
        per-token cross-entropy [b, L] (fp32, no gradient) at ``loss_mask`` positions and 0 elsewhere — for bd3/mdlm
        the masked noisy tokens given the noisy stream, for ar token l given x0[<l] (read from the hidden state at
        l-1; position 0 has no prediction) — and ``nelbo_sum`` = Σ loss_weight·ce, the differentiable training
        objective (0 without ``loss_weight``). For sedd the per-token value is the denoising score entropy of the
        masked token (``model.head``), not the cross-entropy.
        """
        hidden, seq_len = self._stream_hidden(xt, x0, key_padding, sigma)
        if not self.post_process:
            return hidden
        out = hidden[:seq_len].transpose(0, 1)  # [b, L, h]; in bd3 the clean half feeds attention only
        out, loss_mask = self.mode.head_inputs(out, loss_mask)  # ar: the state at l-1 predicts token l
        # the predicted positions, batch-major, found once (one host synchronisation instead of one per bool index)
        idx = loss_mask.reshape(-1).nonzero().squeeze(1)

        def pick(t: torch.Tensor) -> torch.Tensor:  # [b, L, ...] -> [N, ...] at the predicted positions
            return t.reshape(-1, *t.shape[2:]).index_select(0, idx)

        weight = None if loss_weight is None else pick(loss_weight)
        shift = None
        if self.mode.score_entropy:  # SEDD's log scores are logits - log expm1(sigma) - log(V - 1)
            shift = pick(torch.log(torch.expm1(sigma.float()))[:, None].expand(loss_mask.shape))
        head = self.output_layer(pick(out), labels=pick(x0), loss_weight=weight, log_expm1_sigma=shift)
        ce = torch.zeros(loss_mask.numel(), dtype=torch.float32, device=out.device).index_copy_(0, idx, head.ce)
        return HeadOutput(ce.view(loss_mask.shape), head.nelbo_sum)

    def block_logits(self, xt: torch.Tensor, x0: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Logits [b, end-start, V] of noisy positions [start, end) given x_t ⊕ x0 (single-stage models only)."""
        if not (self.pre_process and self.post_process):
            raise RuntimeError("block_logits needs the whole model on one stage (pipeline size 1)")
        if not self.mode.block_sampler:
            raise RuntimeError(f"block sampling is for bd3 models, this one is {self.mode.name}")
        hidden, seq_len = self._stream_hidden(xt, x0)
        return self.full_logits(hidden[start:end].transpose(0, 1))


def mark_pipeline_replicated(module: torch.nn.Module) -> None:
    """Mark ``module``'s parameters as replicated on every pipeline stage (the time embedding): megatron's
    ``pipeline_parallel`` attribute says their gradients are summed over the pipeline group
    (``training.engine.sum_pipeline_replicated_grads``); DeepSpeed's ``ds_pipe_replicated`` on every stage but the
    first keeps the copies from being counted more than once in the gradient norm."""
    first = parallel_state.get_pipeline_model_parallel_rank() == 0
    for param in module.parameters():
        param.pipeline_parallel = True
        param.ds_pipe_replicated = not first


# ---- deterministic, layout-independent initialisation ----
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


def canonical_parameter_names(model: BD3Model) -> dict[str, str]:
    """Map local parameter names to layout-independent names (global layer index under pipeline parallelism)."""
    offsets = {str(i): layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    out = {}
    for name, _ in model.named_parameters():
        m = _LAYER_RE.match(name)
        out[name] = f"decoder.layers.{offsets[m.group(1)]}." + name[m.end() :] if m else name
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
    if canonical_name.endswith(".bias") or ".modulation." in canonical_name:
        return None  # biases, and the adaLN modulation, zero as the reference's adaLN-Zero init
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
            param.fill_(0.0 if cname.endswith(".bias") or ".modulation." in cname else 1.0)
            continue
        shape, dim = full_shape(param)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(cname.encode())) % (2**63))
        full = torch.randn(shape, generator=gen, dtype=torch.float32) * std
        if dim is not None:
            full = full.chunk(parallel_state.get_tensor_model_parallel_world_size(), dim=dim)[tp_rank]
        param.copy_(full.to(param.dtype))


def build_transformer_config(
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    ffn_hidden_size: int | None,
    dropout: float,
    tp: int,
    pp: int,
    params_dtype=torch.float32,
    pipeline_dtype=torch.float32,
    use_cpu_initialization: bool = True,
    add_bias_linear: bool = False,
) -> TransformerConfig:
    """megatron-core TransformerConfig for the BD3 model: pre-LN, GELU(tanh) MLP, no linear biases (``add_bias_linear``
    for arch bd3lms: MLP and head biases), no fusions that need apex/TE (so CPU and GPU run the same math)."""
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        ffn_hidden_size=ffn_hidden_size or 4 * hidden_size,
        hidden_dropout=dropout,
        attention_dropout=0.0,
        add_bias_linear=add_bias_linear,
        activation_func=lambda x: F.gelu(x, approximate="tanh"),
        normalization="LayerNorm",
        layernorm_epsilon=1e-5,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        pipeline_dtype=pipeline_dtype,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,  # recomputation: BD3TransformerLayer
    )
