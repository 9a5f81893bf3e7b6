"""Block-autoregressive BD3 sampling on one device, with an exact KV cache.

A sequence is produced block by block (L' tokens). Each block starts fully masked (or holding the tail of the
prompt) and is denoised by one of three schedules, all sharing the same proposal rule (nucleus sampling or greedy):

* ``ddpm``: S steps on the linear grid t = 1, 1-1/S, ..., 0; at t -> s each masked token is revealed with
  probability (t-s)/t (the reference's q = p·(1-s/t), q[MASK] = s/t). The model has no time input, so its
  x0-prediction is reused while the block is unchanged: a step that reveals nothing costs no forward pass.
* ``first_hitting``: one uniformly chosen masked token is revealed per forward pass (the reference default).
* ``threshold``: every masked token whose most likely value has probability > C is revealed (its token drawn by
  the proposal rule; with C >= the nucleus p that is the confident token), at least the most confident one per
  pass (confidence-threshold parallel decoding: fewer forward passes).

The network is reached through a *denoiser*, which owns the context of clean tokens:

* :class:`RecomputeDenoiser` runs the full training-shaped forward over x_t ⊕ x0 of the window at every call;
* :class:`CachedDenoiser` keeps post-rotary K/V of the clean tokens. The current block attends to
  [cache ; itself], which is exactly M_OBC + M_BD of training; a finished block is run once more as clean tokens
  attending to [cache ; itself] (M_BC) and its K/V appended. That clean pass is fused into the first forward of the
  next block (one call, masked so each half sees what it would see alone), so it costs no extra call.

Both compute the same function, so cached and uncached sampling give the same tokens; in floating point their
logits differ by round-off (~1e-6 in fp32: other kernel shapes), so a draw that lands within that distance of a CDF
boundary can go the other way — negligible for peaked distributions, about one draw in a few thousand for the flat,
thousands-of-tokens nuclei of an untrained model. Near-ties in the threshold schedule's choice of position and in
greedy argmax are broken by a tolerance (leftmost / lowest id), so round-off cannot decide them. Beyond the
training context L the window slides by whole blocks and positions are re-based to 0: with recomputation this is
exact (the model sees a window like those of training); cached K/V were computed with context that has since left
the window, so the cached variant is then an approximation — as in the reference implementation.

Randomness comes from one generator per sample keyed by (seed, sample index), and every draw depends only on that
sample's own state, so a batch gives the same samples as running each sample alone. Variable length (the
reference's rule): a sample stops at its first generated EOS (kept), or when the token entropy of its last 256
tokens falls below 4 nats (the low-entropy window is cut off).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from bd3_megatron.modes import get_mode
from bd3_megatron.sampling.net import BD3Net, KVCache

SCHEDULES = ("ddpm", "first_hitting", "threshold")
CONF_TIE = 1e-6  # confidences this close are equal for the threshold schedule's fallback choice


@dataclass(frozen=True)
class SampleOptions:
    """How to sample. ``length`` counts generated tokens (after the prompt); with ``var_length`` it is a cap."""

    length: int
    block_size: int | None = None  # L' for sampling; default: the model's training block size
    schedule: str = "ddpm"  # ddpm | first_hitting | threshold
    steps: int | None = None  # ddpm steps per block; default: the block size
    threshold: float = 0.9  # confidence for the threshold schedule
    nucleus_p: float = 1.0  # 1.0 = plain sampling from the model's distribution
    greedy: bool = False  # propose the most probable token instead of sampling
    kv_cache: bool = True
    seed: int = 0
    var_length: bool = False  # stop at EOS / entropy collapse
    eos_id: int | None = None
    entropy_window: int = 256
    entropy_min: float = 4.0  # nats
    context_len: int | None = None  # sliding window; default: the model's seq_len (rounded down to blocks)

    def validate(self) -> None:
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block size must be >= 1, got {self.block_size}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 < self.nucleus_p <= 1.0:
            raise ValueError(f"nucleus p must be in (0, 1], got {self.nucleus_p}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.var_length and self.eos_id is None and self.entropy_window <= 0:
            raise ValueError("var_length needs an eos_id or an entropy window")


@dataclass
class SampleResult:
    index: int
    tokens: list[int]  # prompt + generated
    prompt_len: int
    nfe: int  # forward passes this sample needed (excluding the clean K/V passes, like the reference)
    stop: str  # length | eos | entropy
    seconds: float

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def entropy(self) -> float:
        return token_entropy(self.generated)

    @property
    def tokens_per_s(self) -> float:
        return len(self.generated) / max(self.seconds, 1e-9)


@dataclass
class SampleStats:
    model_calls: int = 0  # batched network calls (what the device actually ran)
    seconds: float = 0.0
    tokens: int = 0  # generated tokens over all samples
    results: list[SampleResult] = field(default_factory=list)


def token_entropy(tokens: Sequence[int]) -> float:
    """Shannon entropy (nats) of the token histogram (the reference's sample entropy)."""
    if not tokens:
        return 0.0
    n = len(tokens)
    return -sum(c / n * math.log(c / n) for c in Counter(tokens).values())


def sample_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The generator of sample ``index``: keyed by (seed, index), independent of batch composition."""
    key = int.from_bytes(hashlib.sha256(f"bd3-sample:{seed}:{index}".encode()).digest()[:8], "little") >> 1
    return torch.Generator(device=device).manual_seed(key)


# ---------------------------------------------------------------------------------------------- denoisers
class Denoiser(Protocol):
    calls: int

    def start(self, prefix: torch.Tensor) -> None: ...  # clean context [b, P], P a multiple of L', P <= capacity

    def logits(self, block: torch.Tensor, rows: torch.Tensor) -> torch.Tensor: ...

    # block [b, L'] -> fp32 logits [len(rows), L', V] of those batch rows (the network runs on all rows)

    def commit(self, block: torch.Tensor) -> None: ...  # the finished block joins the clean context

    def keep(self, rows: torch.Tensor) -> None: ...  # drop finished batch rows


class RecomputeDenoiser:
    """No cache: each call runs the training forward over x_t ⊕ x0 of [window ; block] (positions from 0)."""

    def __init__(self, net: BD3Net, block_size: int, context_len: int):
        self.net, self.block_size = net, block_size
        self.capacity = context_len - block_size
        self.calls = 0
        self.ctx: torch.Tensor | None = None

    def start(self, prefix: torch.Tensor) -> None:
        self.ctx = prefix

    def logits(self, block: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        p = self.ctx.shape[1]
        x = torch.cat([self.ctx, block], dim=1)  # earlier noisy blocks hold their clean tokens (never read)
        hidden = self.net.bd3_hidden(x, x, block_size=self.block_size)
        return self.net.logits(hidden.index_select(0, rows)[:, p : p + self.block_size])

    def commit(self, block: torch.Tensor) -> None:
        ctx = torch.cat([self.ctx, block], dim=1)
        self.ctx = ctx[:, ctx.shape[1] - min(ctx.shape[1], self.capacity) :]  # drop whole oldest blocks

    def keep(self, rows: torch.Tensor) -> None:
        self.ctx = self.ctx.index_select(0, rows)


class CachedDenoiser:
    """Post-rotary K/V of the clean context; see the module docstring for the fused clean pass."""

    def __init__(self, net: BD3Net, block_size: int, context_len: int):
        self.net, self.block_size = net, block_size
        self.capacity = context_len - block_size  # clean tokens kept, so [cache ; block] fits the window
        self.calls = 0
        self.cache: KVCache | None = None
        self.pending: torch.Tensor | None = None  # clean tokens whose K/V are not computed yet
        self.param = next(net.parameters())

    def start(self, prefix: torch.Tensor) -> None:
        self.cache = KVCache(
            self.net.cfg, prefix.shape[0], self.capacity + 2 * self.block_size, self.param.device, self.param.dtype
        )
        self.pending = prefix if prefix.shape[1] else None

    def _call(self, block: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """One network call over [pending ; block]: pending tokens attend to [cache ; pending] block-causally
        (M_BC) and are appended; the block attends to the window after eviction plus itself (M_OBC + M_BD)."""
        cache, lb = self.cache, self.block_size
        t = cache.length
        pend = self.pending if self.pending is not None else block[:, :0]
        n_p = pend.shape[1]
        n_b = 0 if block is None else block.shape[1]
        evict = max(0, t + n_p - self.capacity)  # whole blocks, since everything is block aligned
        tokens = pend if block is None else torch.cat([pend, block], dim=1)
        positions = torch.arange(t, t + n_p + n_b, device=tokens.device)
        mask = None
        if n_p or evict:
            dev = tokens.device
            mask = torch.zeros(n_p + n_b, t + n_p + n_b, dtype=torch.bool, device=dev)
            blk = torch.arange(n_p, device=dev) // lb
            mask[:n_p, :t] = True
            mask[:n_p, t : t + n_p] = blk[None, :] <= blk[:, None]
            mask[n_p:, evict:] = True  # the block sees the surviving context, the new clean tokens and itself
        self.calls += 1
        hidden = self.net.run(tokens, positions, cache=cache, attn_mask=mask)
        cache.length = t + n_p
        cache.drop_oldest(evict, self.net)
        self.pending = None
        return None if block is None else self.net.logits(hidden.index_select(0, rows)[:, n_p:])

    def logits(self, block: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self._call(block, rows)

    def commit(self, block: torch.Tensor) -> None:
        if self.pending is not None:  # never two pending commits: compute the older one now
            self._call(None)
        self.pending = block

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.keep(rows)
        if self.pending is not None:
            self.pending = self.pending.index_select(0, rows)


# ---------------------------------------------------------------------------------------------- proposals
def _nucleus(probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [k, m], token ids [k, m]): the smallest set of most probable tokens whose mass reaches p (always
    the top one), most probable first. Exact without sorting the vocabulary: the tokens with probability >= c
    are a prefix of the sorted order, so once their mass reaches p they contain the nucleus and only they need
    ordering (c starts at the 64th largest probability and is divided by 8 until that holds)."""
    v = probs.shape[-1]
    vals, ids = probs.topk(min(v, 64), dim=-1)
    if bool((vals.sum(-1) >= p).all()):
        cut = None
    else:
        cut = vals[:, -1:].clone()
        for _ in range(64):
            short = (probs * (probs >= cut)).sum(-1, keepdim=True) < p
            if not bool(short.any()):
                break
            cut = torch.where(short, cut / 8, cut)
        else:
            cut.zero_()  # flat beyond float range: take everything
        vals, ids = probs.topk(int((probs >= cut).sum(-1).max()), dim=-1)
    keep = (vals.cumsum(-1) - vals) < p  # tokens before which the mass is still below p
    keep[:, 0] = True
    return vals * keep, ids


def propose(logits: torch.Tensor, gen: torch.Generator, nucleus_p: float, greedy: bool) -> torch.Tensor:
    """Token proposals [k] for logits [k, V]: the most probable token, or an inverse-CDF draw (fp64, one uniform per
    position from the sample's own generator) from the nucleus-filtered distribution."""
    probs = torch.softmax(logits.double(), dim=-1)
    if greedy:  # the lowest id among tokens within CONF_TIE of the maximum: immune to round-off between paths
        top = probs.amax(-1, keepdim=True)
        return (probs >= top - CONF_TIE).to(torch.uint8).argmax(-1)
    if nucleus_p < 1.0:
        weights, ids = _nucleus(probs, nucleus_p)
    else:
        weights, ids = probs, None
    cdf = weights.cumsum(-1)
    u = torch.rand(logits.shape[0], 1, generator=gen, dtype=torch.float64, device=logits.device)
    j = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
    return (j if ids is None else ids.gather(-1, j)).squeeze(1)


def denoise_block(
    denoiser: Denoiser,
    block: torch.Tensor,
    gens: list[torch.Generator],
    opts: SampleOptions,
    mask_id: int,
    nfe: list[int],
) -> torch.Tensor:
    """Unmask ``block`` [b, L'] (masked positions = ``mask_id``); ``nfe[r]`` counts the passes row r needed."""
    block = block.clone()
    b, lb = block.shape
    steps = opts.steps or lb
    fresh = [False] * b  # row's cached x0-prediction is valid (block unchanged since computed)
    cached: torch.Tensor | None = None
    step = 0
    while True:
        masked = block == mask_id
        todo = [r for r in range(b) if masked[r].any()]
        if not todo or (opts.schedule == "ddpm" and step >= steps):
            break
        need = [r for r in todo if not fresh[r]]
        if need:  # the network runs on every row; the head only for rows whose prediction is stale
            idx = torch.tensor(need, device=block.device)
            out = denoiser.logits(block, idx)
            if cached is None:
                cached = out.new_empty((b, *out.shape[1:]))
            cached[idx] = out
            for r in need:
                fresh[r] = True
                nfe[r] += 1
        for r in todo:
            pos = masked[r].nonzero().squeeze(1)
            g = gens[r]
            if opts.schedule == "ddpm":
                t, s = 1.0 - step / steps, 1.0 - (step + 1) / steps
                u = torch.rand(pos.numel(), generator=g, dtype=torch.float64, device=block.device)
                pos = pos[u < (t - s) / t] if s > 0 else pos  # the last step reveals everything left
                if pos.numel() == 0:
                    continue  # unchanged: the x0-prediction stays valid
            elif opts.schedule == "first_hitting":
                j = int(torch.randint(pos.numel(), (1,), generator=g, device=block.device))
                pos = pos[j : j + 1]
            else:  # threshold: confidence = probability of the most likely token at the position
                conf = torch.softmax(cached[r, pos].double(), dim=-1).amax(-1)
                keep = conf > opts.threshold
                if not keep.any():  # at least one token per pass: the most confident, where confidences
                    # closer than 1e-6 count as tied (leftmost wins), so round-off between the cached and the
                    # recomputed forward cannot change the choice (e.g. a fully masked block without context)
                    keep = torch.zeros_like(keep)
                    keep[int((conf >= conf.max() - CONF_TIE).nonzero()[0])] = True
                pos = pos[keep]
            block[r, pos] = propose(cached[r, pos], g, opts.nucleus_p, opts.greedy)
            fresh[r] = False
        step += 1
    return block


# ---------------------------------------------------------------------------------------------- the loop
def stop_check(tokens: list[int], prompt_len: int, opts: SampleOptions, checked_from: int) -> tuple[str | None, int]:
    """(reason, new length) if the sample should stop after this block, else (None, len)."""
    if opts.eos_id is not None:
        for i in range(max(prompt_len, checked_from), len(tokens)):
            if tokens[i] == opts.eos_id:
                return "eos", i + 1
    w = opts.entropy_window
    if w > 0 and len(tokens) > w and token_entropy(tokens[-w:]) < opts.entropy_min:
        return "entropy", max(prompt_len, len(tokens) - w)
    return None, len(tokens)


def prompt_rows(prompt: Sequence[int] | torch.Tensor | None, num_samples: int, cfg) -> torch.Tensor:
    """The prompt as [num_samples, p] int64 (p = 0 without one) from ids [p] shared by all samples or [n, p].
    Raises ValueError for a row count other than ``num_samples``, ids outside the vocabulary or the mask id."""
    if prompt is None:
        return torch.zeros(num_samples, 0, dtype=torch.long)
    prompt_t = torch.as_tensor(prompt, dtype=torch.long)
    prompt_t = prompt_t.expand(num_samples, -1) if prompt_t.dim() == 1 else prompt_t
    if prompt_t.shape[0] != num_samples:
        raise ValueError(f"prompt has {prompt_t.shape[0]} rows for {num_samples} samples")
    mask_id = cfg.mask_token_id
    if ((prompt_t < 0) | (prompt_t >= cfg.vocab_size) | (prompt_t == mask_id)).any():
        raise ValueError(f"prompt ids must lie in [0, {cfg.vocab_size}) and not be the mask id {mask_id}")
    return prompt_t


@torch.inference_mode()
def generate(
    net: BD3Net,
    num_samples: int,
    opts: SampleOptions,
    prompt: Sequence[int] | torch.Tensor | None = None,
    first_index: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> SampleStats:
    """Sample ``num_samples`` sequences as one batch (sample i uses generator (seed, first_index + i)).

    ``prompt``: token ids shared by all samples ([p]) or one row per sample ([n, p]); the first generated block
    is aligned to the model's block grid, so a prompt tail shorter than a block is denoised around."""
    opts.validate()
    cfg = net.cfg
    if get_mode(cfg.mode).score_entropy:  # SEDD: the reference's analytic sampler over the whole context
        from bd3_megatron.sampling.sedd_sampler import generate_sedd

        return generate_sedd(net, num_samples, opts, prompt, first_index, progress)
    if not get_mode(cfg.mode).block_sampler:
        raise ValueError(
            f"this is a model.mode={cfg.mode} checkpoint; the block diffusion sampler needs a bd3 model "
            f"(an ar checkpoint scores samples: tools/eval_ppl.py --gen-ppl-model)"
        )
    lb = opts.block_size or cfg.block_size
    if opts.context_len is None and lb > cfg.seq_len:  # else the rounded-down context below would read 0
        raise ValueError(f"block size {lb} is larger than the model's context of {cfg.seq_len} tokens (seq_len)")
    context = opts.context_len or (cfg.seq_len // lb) * lb
    if context % lb or context < lb:
        raise ValueError(f"context length {context} must be a positive multiple of the block size {lb}")
    device = next(net.parameters()).device
    mask_id = cfg.mask_token_id
    prompt_t = prompt_rows(prompt, num_samples, cfg)
    p = prompt_t.shape[1]
    full = p - p % lb
    total = p + opts.length
    den_cls = CachedDenoiser if opts.kv_cache else RecomputeDenoiser
    denoiser: Denoiser = den_cls(net, lb, context)
    capacity = context - lb
    denoiser.start(prompt_t[:, full - min(full, capacity) : full].to(device))

    seqs = [row.tolist() for row in prompt_t[:, :full]]
    active = list(range(num_samples))
    gens = [sample_generator(opts.seed, first_index + i, device) for i in range(num_samples)]
    nfe = [0] * num_samples
    results: dict[int, SampleResult] = {}
    t0 = time.perf_counter()
    cur, tail = full, prompt_t[:, full:]
    while active:
        block = torch.full((len(active), lb), mask_id, dtype=torch.long)
        if tail.shape[1]:  # first block: the prompt's tail is given, the rest is masked
            block[:, : tail.shape[1]] = tail[active]
        block = block.to(device)
        act_nfe = [nfe[i] for i in active]
        block = denoise_block(denoiser, block, [gens[i] for i in active], opts, mask_id, act_nfe)
        for j, i in enumerate(active):
            nfe[i] = act_nfe[j]
        denoiser.commit(block)
        tail = tail[:, :0]
        rows = block.tolist()
        cur += lb
        still: list[int] = []
        for j, i in enumerate(active):
            seqs[i].extend(rows[j])
            reason, keep = (None, len(seqs[i]))
            if opts.var_length:
                reason, keep = stop_check(seqs[i], p, opts, cur - lb)
            if reason is None and cur >= total:
                reason, keep = "length", total
            if reason is None:
                still.append(j)
                continue
            results[i] = SampleResult(i + first_index, seqs[i][:keep], p, nfe[i], reason, time.perf_counter() - t0)
        if len(still) < len(active):
            if still:
                idx = torch.tensor(still, device=device)
                denoiser.keep(idx)
            active = [active[j] for j in still]
        if progress is not None:
            progress(min(cur, total) - p, total - p)
    stats = SampleStats(model_calls=denoiser.calls, seconds=time.perf_counter() - t0)
    stats.results = [results[i] for i in range(num_samples)]
    stats.tokens = sum(len(r.generated) for r in stats.results)
    return stats
