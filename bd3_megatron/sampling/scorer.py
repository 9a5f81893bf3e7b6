"""Autoregressive scorers: per-token log-likelihood of text, for the generative perplexity of samples.

Three kinds, all behind :func:`load_scorer`:

* this project's **AR baseline** (``model.mode=ar``): token l is predicted from the causal state at l-1;
* this project's **BD3 models with L'=1**: token l is predicted by a mask token at position l that attends to the
  clean prefix x0[<l] (the x_t ⊕ x0 forward with every token masked, i.e. the clip window (1, 1)). This is an exact
  autoregressive factorisation, and its mean NLL equals the model's NELBO at window (1, 1) (tested);
* any local **Hugging Face causal LM** folder (``transformers``, nothing downloaded).

Project checkpoints are read from a training checkpoint of any TP/PP layout or a folder written by
``tools/convert.py`` and run on the plain-PyTorch :class:`BD3Net` (no megatron-core needed). Texts are retokenized
with the scorer's own tokenizer, as the reference does with GPT-2 Large. Texts longer than the scorer's context are
scored in sliding windows (context C, stride C/2; each later window scores only its new tokens), and targets that
are the scorer's EOS token are not counted (the reference excludes them). The first token is never counted: no
causal scorer has context for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from bd3_megatron.modes import get_mode


class Scorer(Protocol):
    name: str
    context: int  # tokens per forward window
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def window_nll(self, ids: torch.Tensor) -> torch.Tensor:
        """NLL [S] (fp32) of each token of one window ``ids`` [S] given the window's earlier tokens; NaN where the
        scorer has no prediction (position 0 of a next-token model)."""


def window_spans(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) of each window over n tokens: windows start every ``stride`` tokens and span at
    most ``context``; each one scores targets [first_scored, end), so every target is scored exactly once."""
    if not 0 < stride <= context:
        raise ValueError(f"stride {stride} must lie in (0, context {context}]")
    spans, start, done = [], 0, 0
    while True:
        end = min(start + context, n)
        spans.append((start, end, done))
        if end >= n:
            return spans
        done, start = end, start + stride


def sequence_nll(scorer: Scorer, ids: Sequence[int]) -> torch.Tensor:
    """NLL [n] of every token of ``ids`` (NaN where not predicted), windowed as described in the module doc."""
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    out = torch.full((len(ids_t),), float("nan"))
    for start, end, first in window_spans(len(ids_t), scorer.context, max(scorer.context // 2, 1)):
        nll = scorer.window_nll(ids_t[start:end]).float().cpu()
        out[first:end] = nll[first - start :]
    return out


@dataclass
class GenerativePerplexity:
    per_sample: list[float]  # exp(mean NLL) of each text (NaN when it has no counted token)
    mean: float  # arithmetic mean of the per-sample perplexities (what the reference reports)
    token_weighted: float  # exp(total NLL / total counted tokens)
    tokens: int


def generative_perplexity(scorer: Scorer, texts: Sequence[str]) -> GenerativePerplexity:
    per_sample, total, count = [], 0.0, 0
    for text in texts:
        ids = scorer.encode(text)
        nll = sequence_nll(scorer, ids)
        keep = ~torch.isnan(nll)
        keep[:1] = False  # the first token has no context
        if scorer.eos_token_id is not None:
            keep &= torch.as_tensor(ids, dtype=torch.long) != scorer.eos_token_id
        n = int(keep.sum())
        per_sample.append(math.exp(float(nll[keep].mean())) if n else float("nan"))
        total, count = total + float(nll[keep].sum()), count + n
    finite = [p for p in per_sample if not math.isnan(p)]
    return GenerativePerplexity(
        per_sample=per_sample,
        mean=sum(finite) / len(finite) if finite else float("nan"),
        token_weighted=math.exp(total / count) if count else float("nan"),
        tokens=count,
    )


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """NLL [S] of ``ids`` [S] when the logits [S, V] at l predict token l+1; NaN at position 0 (no prediction)."""
    nll = torch.full(ids.shape, float("nan"), device=logits.device)
    nll[1:] = F.cross_entropy(logits[:-1], ids[1:], reduction="none")
    return nll


class ProjectScorer:
    """A checkpoint of this project as an autoregressive scorer (the AR baseline, or a BD3 model with L'=1)."""

    def __init__(self, ckpt, device: torch.device | str = "cpu"):
        from bd3_megatron.sampling.net import build_net

        cfg = ckpt.config
        self.causal = not get_mode(cfg.mode).diffusion  # the AR baseline; else a block diffusion model at L'=1
        if not self.causal and cfg.block_size != 1:
            raise ValueError(
                f"a bd3 model with block size L'={cfg.block_size} is not an autoregressive scorer (its "
                f"likelihood is only bounded by the NELBO); score with a model.mode=ar checkpoint or a "
                f"bd3 model trained with model.block_size=1"
            )
        if not ckpt.tokenizer:
            raise ValueError("the checkpoint names no tokenizer, so texts cannot be retokenized for scoring")
        from data_pipeline.tokenizers import get_tokenizer

        self.tokenizer = get_tokenizer(ckpt.tokenizer)
        self.cfg = cfg
        self.net = build_net(cfg, ckpt.state, device=device)
        self.device = torch.device(device)
        self.context = cfg.seq_len
        self.eos_token_id = self.tokenizer.eos_token_id
        kind = cfg.mode if self.causal else f"{cfg.mode} L'=1"
        self.name = f"{kind} checkpoint {ckpt.source.get('path', '')}".strip()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    @torch.no_grad()
    def window_nll(self, ids: torch.Tensor) -> torch.Tensor:
        x0 = ids.to(self.device)[None]
        if self.causal:
            return next_token_nll(self.net.logits(self.net.causal_hidden(x0))[0], x0[0])
        xt = torch.full_like(x0, self.cfg.mask_token_id)  # every token masked: window (1, 1)
        logits = self.net.bd3_logits(xt, x0, block_size=1)[0]
        return F.cross_entropy(logits, x0[0], reduction="none")


class HFScorer:
    """A local Hugging Face causal-LM folder (model + tokenizer files) as a scorer."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.lm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).to(device).eval()
        cfg = self.lm.config
        self.context = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024
        self.eos_token_id = self.tokenizer.eos_token_id
        self.device = torch.device(device)
        self.name = f"hf causal LM {folder}"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    @torch.no_grad()
    def window_nll(self, ids: torch.Tensor) -> torch.Tensor:
        x = ids.to(self.device)[None]
        return next_token_nll(self.lm(x).logits[0].float(), x[0])


def _is_project_folder(path: Path) -> bool:
    """A training checkpoint, or a sampler folder in a layout ``tools/convert.py`` reads (native or bd3lm HF)."""
    from bd3_megatron.checkpoint.from_training import is_training_checkpoint
    from bd3_megatron.checkpoint.sampler import detect_format

    if is_training_checkpoint(path):
        return True
    try:
        detect_format(path)
    except (FileNotFoundError, ValueError):
        return False
    return True


def load_scorer(path: str | Path, device: torch.device | str = "cpu") -> Scorer:
    """A scorer from a project checkpoint (training checkpoint root/step dir, or a tools/convert.py folder) or a
    Hugging Face causal-LM folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"scorer {path} does not exist")
    if _is_project_folder(path):
        from bd3_megatron.checkpoint.from_training import read_input

        return ProjectScorer(read_input(path, log=lambda msg: None), device=device)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"scorer {path} is neither a checkpoint of this project (training checkpoint or "
            f"tools/convert.py folder) nor a Hugging Face model folder (no config.json)"
        )
    return HFScorer(path, device=device)
