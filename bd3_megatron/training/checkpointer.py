"""The checkpointer: when to save, saving, resuming (with fallback past damaged checkpoints and resharding to
another layout), and starting from another run's weights (``checkpoint.init_from``).

The on-disk format is ``bd3_megatron.checkpoint.sharded``; this component decides what goes in (weights by
layout-independent name with their TP partition dims, EMA, engine state, RNG, the run's metadata) and restores it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bd3_megatron.checkpoint import foreign
from bd3_megatron.checkpoint import sharded as ckpt
from bd3_megatron.config import Config
from bd3_megatron.diffusion.schedule import ClipWindow
from bd3_megatron.model.bd3_model import canonical_parameter_names
from bd3_megatron.parallel.state import ParallelContext
from bd3_megatron.training.batches import BatchMaker
from bd3_megatron.training.engine import DeepSpeedEngine, optimizer_state_classes
from bd3_megatron.training.optim import EMA
from bd3_megatron.training.resume_check import check_resume, zero_stage_change
from bd3_megatron.training.state import TrainState


class TrainingStopped(RuntimeError):
    """Training could not continue (e.g. too many consecutive non-finite steps); the last checkpoint is intact."""


class Checkpointer:
    """Saves and restores a run in ``checkpoint.dir`` (collective: every rank calls every method)."""

    def __init__(
        self,
        cfg: Config,
        ctx: ParallelContext,
        engine: DeepSpeedEngine,
        ema: EMA | None,
        state: TrainState,
        batches: BatchMaker,
        run_info: dict,
        log,
    ):
        """``run_info``: what the metadata records about the data and tokenizer (``data``, ``tokenizer``,
        ``vocab_size``, ``mask_token_id``); ``log(text)`` writes a line to the run's log."""
        self.cfg, self.ctx, self.engine, self.ema, self.state = cfg, ctx, engine, ema, state
        self.batches, self.run_info, self.log = batches, run_info, log
        self.named = dict(engine.module.named_parameters())
        self.canonical = canonical_parameter_names(engine.module)
        self.layout = ckpt.Layout.of(ctx)
        if cfg.checkpoint.dir:  # a read-only or non-directory checkpoint.dir fails now, not at the first save
            ckpt.check_dir_writable(cfg.checkpoint.dir)
        # checkpoints this run wrote or verified on load (pruning deletes only behind them), the step resumed from,
        # and the newest step known to be intact (named when a save fails)
        self.verified: set[str] = set()
        self.resumed_step: int | None = None
        self.intact_step: int | None = None

    def due(self, done: bool) -> bool:
        """Whether the step just finished is saved: every ``checkpoint.interval`` steps and at the end."""
        c = self.cfg.checkpoint
        return bool(c.dir) and (done or bool(c.interval and self.state.step % c.interval == 0))

    # ------------------------------------------------------------------ save
    def _model_state(self) -> dict:
        state = {
            "model": {self.canonical[n]: p.detach().cpu() for n, p in self.named.items()},
            # how each tensor is split across tensor-parallel ranks (None: replicated); read by convert/reshard
            "tp_partition": {
                self.canonical[n]: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
                for n, p in self.named.items()
            },
        }
        if self.ema is not None:
            ema = self.ema.state_dict()
            state["ema"] = {
                "decay": ema["decay"],
                "num_updates": ema["num_updates"],
                "shadow": {self.canonical[n]: v.cpu() for n, v in ema["shadow"].items()},
            }
        return state

    def save(self) -> None:
        """Checkpoint the current step. Refuses to publish non-finite weights or EMA (every rank checks its shard; all
        agree), and turns a failed write into TrainingStopped naming the intact step."""
        c, step = self.cfg.checkpoint, self.state.step
        if c.dir is None:
            return
        model_state = self._model_state()
        bad = [
            f"{name} on rank {rank}"
            for rank, names in enumerate(ckpt.all_ranks(ckpt.non_finite(model_state)))
            for name in names[:2]
        ]
        if bad:
            intact = f"step {self.intact_step} is intact" if self.intact_step is not None else "no checkpoint exists"
            raise TrainingStopped(
                f"non-finite weights at step {step} ({', '.join(bad[:4])}): checkpoint not written; {intact}"
            )
        meta = {
            "config": self.cfg.to_dict(),
            "consumed_samples": step * self.cfg.train.global_batch_size,
            "skipped_steps": self.state.skipped_steps,
            "data": {"stream": "ShuffledStream", **self.run_info["data"]},
            "tokenizer": self.run_info["tokenizer"],
            "vocab_size": self.run_info["vocab_size"],
            "clip_window": [self.batches.window.eps_min, self.batches.window.eps_max],
            "mask_token_id": self.run_info["mask_token_id"],
        }
        try:
            path = ckpt.save_checkpoint(
                c.dir,
                step,
                self.layout,
                model_state=model_state,
                optim_state={"engine": self.engine.state_dict(), "step": step},
                metadata=meta,
                keep=c.keep,
                verified=self.verified,
                resumed_step=self.resumed_step,
                intact_step=self.intact_step,
            )
        except ckpt.CheckpointSaveError as exc:
            raise TrainingStopped(str(exc)) from None
        self.verified.add(path.name)
        self.intact_step = step
        self.log(f"saved checkpoint {path}")

    # ------------------------------------------------------------------ resume
    def _read_resume_state(self, path) -> dict:
        """Everything a same-layout (or resharded) resume needs from ``path``, read into memory and verified (sizes,
        sha256, finite tensors) before any of it touches the model. Raises CheckpointDamaged for damage and
        CheckpointError for a checkpoint this run cannot continue (other shapes, layout, ZeRO stage)."""
        c = self.cfg.checkpoint
        meta = ckpt.read_metadata(path)
        info = self.run_info
        for note in check_resume(path, meta, self.cfg, info["data"], info["vocab_size"], info["mask_token_id"]):
            self.log(note)
        same_layout = ckpt.layout_matches(meta, self.layout)
        if not same_layout and not c.reshard:
            ckpt.check_layout(meta, self.layout, path)  # raises with the explanation
        zero = zero_stage_change(meta, self.cfg)
        if zero and not c.reshard:
            raise ckpt.CheckpointError(
                f"{path} was saved with parallel.zero_stage={zero[0]} but this run has "
                f"parallel.zero_stage={zero[1]}: its optimizer state does not load into "
                f"another stage; resume with parallel.zero_stage={zero[0]}, or set "
                f"checkpoint.reshard=true to load the weights and EMA with a fresh optimizer"
            )
        state = {"meta": meta, "same_layout": same_layout, "zero": zero}
        if same_layout:
            mstate = ckpt.load_file(path / self.layout.model_file(), meta=meta)
            state.update(weights=mstate["model"], ema=mstate.get("ema"))
            # every data-parallel rank's ZeRO partition of this (tp, pp) position: DeepSpeed rebuilds its own
            # (another ZeRO stage's partitions do not load: that resume starts a fresh optimizer)
            state["optim"] = (
                []
                if zero
                else [
                    ckpt.load_file(path / self.layout.optim_file(r), optimizer_state_classes(), meta=meta)
                    for r in range(self.ctx.dp)
                ]
            )
            state["rng"] = ckpt.load_file(path / self.layout.rng_file(), meta=meta)
        else:
            state["weights"], state["ema"] = ckpt.load_resharded(path, meta, self.named, self.canonical)
        return state

    def maybe_resume(self) -> None:
        """Resume from the newest intact checkpoint (see ckpt.resume_candidates): a damaged one (any rank's files)
        is named in the log and the next older one tried; none intact raises CheckpointError. Ranks agree on each
        candidate before loading anything, so every rank resumes from the same step. With no checkpoint to resume,
        ``checkpoint.init_from`` (if set) supplies the starting weights."""
        c = self.cfg.checkpoint
        candidates, notes = ckpt.resume_candidates(c.resume, c.dir)
        for note in notes:
            self.log(f"warning: {note}")
        if not candidates:
            if c.init_from:
                self.init_from(c.init_from)
            return
        damage: list[str] = []
        for path in candidates:
            try:
                loaded, problem = self._read_resume_state(path), None
            except ckpt.CheckpointDamaged as exc:
                loaded, problem = None, str(exc)
            problems = sorted({p for p in ckpt.all_ranks(problem) if p is not None})
            if not problems:
                break
            damage.append(f"{path.name}: {problems[0]}")
            self.log(f"warning: checkpoint {path} is damaged and not used: {'; '.join(problems)}")
        else:
            where = Path(c.resume) if c.resume != "auto" else Path(c.dir)
            raise ckpt.CheckpointError(
                f"no intact checkpoint in {where} ({'; '.join(damage)}); restore one, or set "
                f"checkpoint.resume=none with a new checkpoint.dir to start over"
            )
        meta, same_layout, zero = loaded["meta"], loaded["same_layout"], loaded["zero"]
        self.load_weights(loaded["weights"], source=path)
        ema = loaded["ema"]
        if self.ema is not None and ema is not None:
            by_canonical = {self.canonical[n]: n for n in self.named}
            self.ema.load_state_dict(
                {
                    "decay": ema["decay"],
                    "num_updates": ema["num_updates"],
                    "shadow": {by_canonical[k]: v for k, v in ema["shadow"].items()},
                }
            )
        if same_layout and not zero:
            self.engine.load_state_dict([o["engine"] for o in loaded["optim"]])
        if same_layout:
            ckpt.set_rng_state(loaded["rng"])
        self.state.step = meta["step"]
        self.resumed_step = self.intact_step = self.state.step
        self.verified.add(path.name)
        self.state.skipped_steps = meta.get("skipped_steps", 0)
        if "clip_window" in meta and self.cfg.diffusion.clip_search and not self.cfg.diffusion.fix_clipping:
            self.batches.window = ClipWindow(*meta["clip_window"])  # the searched window survives a restart
        how = "" if same_layout else f" (weights resharded from layout {meta['layout']}, fresh optimizer state)"
        if zero and same_layout:
            how = f" (weights and EMA loaded, fresh optimizer state: ZeRO stage {zero[0]} -> {zero[1]})"
        self.log(f"resumed from {path} at step {self.state.step}{how}")

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor], source) -> None:
        """Copy canonical-named tensors (this rank's shards) into the model; the names must match exactly."""
        load_canonical(self.named, self.canonical, weights, source)
        self.engine.guard.bounds = None  # the update bound is re-measured for the new weights

    def init_from(self, spec: str) -> None:
        """Start from another run's weights, resharded to this layout; the step and optimizer start fresh.

        ``checkpoint.init_from_weights`` picks the pretrain's EMA (default; the reference fine-tunes from the released
        EMA weights) or its raw weights. Both the model and this run's EMA start from them, so the step-0 evaluation
        scores exactly those weights. Raises CheckpointError for another architecture or tokenizer, or when ema is
        asked of a run that kept no EMA."""
        if foreign.is_foreign(spec):  # a sampler / bd3lms HF folder or a bd3lms Lightning .ckpt (checkpoint/foreign.py)
            ck = foreign.read_foreign(spec, self.cfg.checkpoint.init_from_weights)
            info = self.run_info
            weights = foreign.weights_for_rank(
                ck,
                self.cfg.model,
                info["vocab_size"],
                info["mask_token_id"],
                info["tokenizer"],
                self.named,
                self.canonical,
                spec,
            )
            self.load_weights(weights, source=spec)
            if self.ema is not None:
                self.ema.restart(self.named)
            self.log(f"initialised weights from {spec} ({ck.source}); training starts at step 0")
            return
        path = ckpt.resolve_checkpoint(spec, None)
        if path is None:
            raise ckpt.CheckpointError(f"checkpoint.init_from={spec!r} names no checkpoint")
        meta = ckpt.read_metadata(path)
        saved = meta["config"]["model"]
        for key in ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size"):
            if saved[key] != getattr(self.cfg.model, key):
                raise ckpt.CheckpointError(
                    f"checkpoint.init_from {path} has model.{key}={saved[key]} but this run "
                    f"has {getattr(self.cfg.model, key)}; the architectures must match"
                )
        if meta.get("tokenizer") != self.run_info["tokenizer"]:
            raise ckpt.CheckpointError(
                f"checkpoint.init_from {path} uses tokenizer {meta.get('tokenizer')!r}, this "
                f"run {self.run_info['tokenizer']!r}"
            )
        which = self.cfg.checkpoint.init_from_weights
        weights, ema = ckpt.load_resharded(path, meta, self.named, self.canonical)
        if which == "ema":
            if ema is None:
                raise ckpt.CheckpointError(
                    f"checkpoint.init_from {path} holds no EMA (its run had optim.ema=0); set "
                    f"checkpoint.init_from_weights=raw"
                )
            weights = ema["shadow"]
        self.load_weights(weights, source=path)
        if self.ema is not None:  # this run's EMA restarts from the loaded weights (its warm-up hides the jump)
            self.ema.restart(self.named)
        self.log(
            f"initialised weights from the {'EMA' if which == 'ema' else 'raw'} weights of {path} "
            f"(step {meta['step']}, block size {saved['block_size']} -> {self.cfg.model.block_size}); "
            f"training starts at step 0"
        )


@torch.no_grad()
def load_canonical(
    named: dict[str, torch.Tensor], canonical: dict[str, str], weights: dict[str, torch.Tensor], source
) -> None:
    """Copy ``weights`` (this rank's shards by layout-independent name) into the parameters ``named`` (local name ->
    tensor; ``canonical`` maps local to layout-independent names). Raises CheckpointError unless the names match
    exactly."""
    by_canonical = {canonical[n]: n for n in named}
    differing = sorted(set(weights) ^ set(by_canonical))
    if differing:
        raise ckpt.CheckpointError(f"{source}: model tensors do not match this model (differing: {differing[:4]})")
    for cname, tensor in weights.items():
        named[by_canonical[cname]].copy_(tensor)
