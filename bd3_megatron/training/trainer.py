"""The training loop: megatron-core forward/backward schedules, an optimizer engine, eval, checkpoints, samples."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state

from bd3_megatron.checkpoint import sharded as ckpt
from bd3_megatron.config import Config, validate_layout
from bd3_megatron.diffusion.schedule import ClipWindow
from bd3_megatron.diffusion.variance import block_has_tokens, block_means, clip_window_grid, search_clip_window
from bd3_megatron.model.bd3_model import HeadOutput, canonical_parameter_names
from bd3_megatron.model.build import build_model
from bd3_megatron.parallel.device import device_redirect
from bd3_megatron.parallel.state import ParallelContext
from bd3_megatron.training.batches import BatchMaker, MicroBatch, sample_indices
from bd3_megatron.training.engine import DeepSpeedEngine, optimizer_state_classes
from bd3_megatron.training.metrics import MetricsLogger, VarianceWatch
from bd3_megatron.training.optim import EMA, lr_at
from bd3_megatron.training.resume_check import check_resume, zero_stage_change


class PreemptionRequested(Exception):
    """A checkpoint was saved because the scheduler asked the job to stop (SIGUSR1/SIGTERM); requeue to continue."""


class StopSignal:
    """Remembers SIGUSR1/SIGTERM so the loop can checkpoint at the next step boundary instead of dying mid-step.
    The launcher creates it before the process group starts, so a stop asked during start-up is not lost."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def agreed(self, device) -> bool:
        """True on every rank as soon as any rank got a signal (one all-reduce per step)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag)
        return bool(flag.item() > 0)


class TrainingStopped(RuntimeError):
    """Training could not continue (e.g. too many consecutive non-finite steps); the last checkpoint is intact."""


def loss_from_head(batch: MicroBatch, block_size: int, out: HeadOutput):
    """megatron schedule loss_func: NELBO averaged over all (real: padding excluded) tokens of the micro-batch
    (reference convention), plus the per-block estimates the clip-window search and the variance monitor score; with
    padding also ``block_keep`` [b, num_blocks], the blocks that hold real tokens (the others have no estimate).

    ``out.nelbo_sum`` (Σ weight·CE over the masked tokens, differentiable) carries the gradient; the per-token terms
    ``out.ce · batch.weight`` [b, L] (no gradient) feed the statistics."""
    weighted = out.ce * batch.weight
    tokens = batch.num_tokens  # the int b*L without padding: wrapped batches compute exactly what they always did
    loss = out.nelbo_sum / tokens
    report = {
        "loss": loss.detach().clone(),
        "weighted_sum": weighted.sum(),
        "tokens": torch.as_tensor(tokens).float(),
        "block_t": batch.t,
    }
    if batch.padding is None:
        return loss, {**report, "block_losses": block_means(weighted, block_size)}
    real = ~batch.padding
    return loss, {
        **report,
        "block_losses": block_means(weighted, block_size, real),
        "block_keep": block_has_tokens(real, block_size),
    }


def _kept_blocks(report: dict, key: str) -> torch.Tensor:
    """A report's per-block values (block_losses or block_t), flat, without the blocks of padding only."""
    keep = report.get("block_keep")
    return report[key].flatten() if keep is None else report[key][keep]


class Trainer:
    def __init__(self, cfg: Config, ctx: ParallelContext):
        from data_pipeline.tokenizers import get_tokenizer
        from data_pipeline.training_data import open_training_data

        self.cfg, self.ctx = cfg, ctx
        self.dp = validate_layout(cfg, ctx.world_size)
        if cfg.checkpoint.dir:  # a read-only or non-directory checkpoint.dir fails now, not at the first save
            ckpt.check_dir_writable(cfg.checkpoint.dir)
        t = cfg.train
        self.micro_batches = t.global_batch_size // (t.micro_batch_size * self.dp)
        self.device = ctx.runtime.device
        self.dtype = ctx.runtime.compute_dtype(cfg.train.precision)
        self.tokenizer = get_tokenizer(cfg.data.tokenizer)
        self.train_rows, self.val_rows, self.data_info, self.stream = open_training_data(
            cfg.data, self.tokenizer, cfg.model.seq_len, seed=t.seed, rank=ctx.rank
        )
        model = build_model(cfg, ctx, self.tokenizer.vocab_size, self.tokenizer.mask_token_id)
        self.engine = DeepSpeedEngine(model, cfg, ctx, self.dp, self.micro_batches, bf16=self.dtype == torch.bfloat16)
        self.model = self.engine.module
        self.named = dict(self.model.named_parameters())
        self.canonical = canonical_parameter_names(self.model)
        self.ema = EMA(self.named, cfg.optim.ema) if cfg.optim.ema > 0 else None
        self.batches = BatchMaker(cfg, self.tokenizer.mask_token_id, self.device)
        self.layout = ckpt.Layout(ctx.tp, ctx.pp, self.dp, ctx.tp_rank, ctx.pp_rank, ctx.dp_rank, ctx.rank)
        self.step = 0
        # checkpoints this run wrote or verified on load (pruning deletes only behind them), the step resumed from,
        # and the newest step known to be intact (named when a save fails)
        self.verified: set[str] = set()
        self.resumed_step: int | None = None
        self.intact_step: int | None = None
        self.bad_steps = 0
        self.skipped_steps = 0
        # gradient-variance probe: the final LayerNorm weight's gradient of each micro-batch (a small tensor every
        # last-stage rank holds in full) is captured by a tensor hook, before any accumulation or reduction
        self._probe_grads: list[torch.Tensor] = []
        if ctx.is_last_stage:
            self.model.decoder.final_layernorm.weight.register_hook(self._capture_probe_grad)
        self.logger = MetricsLogger(
            cfg.log.dir,
            ctx.is_logging_rank,
            progress=cfg.log.progress,
            max_steps=t.max_steps,
            wandb_project=cfg.log.wandb_project if cfg.log.wandb else None,
            wandb_mode=cfg.log.wandb_mode,
            config=cfg.to_dict(),
        )

    # ------------------------------------------------------------------ forward/backward
    def _run_schedule(self, micro_batches: list[MicroBatch], forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            with self.ctx.runtime.autocast(self.dtype):
                out = model(batch.xt, batch.x0, batch.masked, batch.weight, batch.padding)
            return out, partial(loss_from_head, batch, self.cfg.model.block_size)

        with device_redirect():
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(micro_batches),
                model=self.model,
                num_microbatches=len(micro_batches),
                seq_length=2 * self.cfg.model.seq_len,
                micro_batch_size=self.cfg.train.micro_batch_size,
                forward_only=forward_only,
            )

    def _train_micro_batches(self, step: int) -> list[MicroBatch]:
        t = self.cfg.train
        out = []
        for m in range(self.micro_batches):
            idx = sample_indices(step, m, self.ctx.dp_rank, self.dp, t.micro_batch_size, t.global_batch_size)
            x0, padding = self.stream.get_with_padding(idx)
            out.append(self.batches.corrupt(x0, torch.from_numpy(idx), step, padding=padding))
        return out

    def train_step(self) -> dict:
        self.model.train()
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.max_steps)
        self.engine.set_lr(lr)
        micro = self._train_micro_batches(self.step)
        if self.ctx.pp > 1:  # megatron's 1F1B schedule accumulates; DeepSpeed reduces and steps once
            reports = self._run_schedule(micro, forward_only=False)
        else:  # DeepSpeed drives the micro-batches (any ZeRO stage)
            reports = []
            for batch in micro:
                with self.ctx.runtime.autocast(self.dtype):
                    out = self.engine.engine(batch.xt, batch.x0, batch.masked, batch.weight, batch.padding)
                loss, report = loss_from_head(batch, self.cfg.model.block_size, out)
                self.engine.backward(loss)
                reports.append(report)
        grad_norm, applied = self.engine.step()
        loss = self._mean_over_data_parallel(reports)
        stats = {**self._nelbo_statistics(reports), **self._gradient_statistics()} if self.ctx.is_last_stage else {}
        if applied:  # decided from the global grad norm, so identical on every rank (the loss lives on the last stage)
            self.bad_steps = 0
            if self.ema is not None:
                self.ema.update(self.named)
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
        self.step += 1
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped_steps": self.skipped_steps, **stats}

    def _capture_probe_grad(self, grad: torch.Tensor) -> None:
        self._probe_grads.append(grad.detach().float().clone())

    def _gradient_statistics(self) -> dict:
        """Variance of per-micro-batch gradients on the probe tensor across micro-batches and data-parallel ranks:
        ``grad_var`` (mean over coordinates of the unbiased variance) and ``grad_noise_ratio`` = trace of the
        covariance / squared norm of the mean gradient (large = noise-dominated steps)."""
        grads, self._probe_grads = self._probe_grads, []
        if not grads:
            return {}
        g = torch.stack(grads) * len(grads)  # hooks see d(loss / micro_batches); undo the averaging
        if self.dp > 1:
            g = self._gather_data_parallel(g)
        if g.shape[0] < 2:
            return {}
        var = g.double().var(dim=0, unbiased=True)
        mean = g.double().mean(dim=0)
        return {
            "grad_var": float(var.mean()),
            "grad_noise_ratio": float(var.sum() / mean.pow(2).sum().clamp_min(1e-30)),
        }

    def _nelbo_statistics(self, reports: list[dict], buckets: int = 10) -> dict:
        """Cheap live variance monitoring: mean and variance of the step's per-block NELBO estimates over all
        micro-batches and data-parallel ranks, and the mean loss per t bucket (one small all-reduce)."""
        bl = torch.cat([_kept_blocks(r, "block_losses") for r in reports]).double()
        bt = torch.cat([_kept_blocks(r, "block_t") for r in reports]).to(bl.device)
        idx = torch.clamp((bt * buckets).long(), 0, buckets - 1)
        vec = torch.cat(
            [
                torch.stack(
                    [bl.sum(), (bl * bl).sum(), torch.tensor(float(bl.numel()), dtype=bl.dtype, device=bl.device)]
                ),
                torch.zeros(buckets, dtype=bl.dtype, device=bl.device).index_add_(0, idx, bl),
                torch.zeros(buckets, dtype=bl.dtype, device=bl.device).index_add_(0, idx, torch.ones_like(bl)),
            ]
        )
        if self.dp > 1:
            torch.distributed.all_reduce(vec, group=parallel_state.get_data_parallel_group())
        s1, s2, n = float(vec[0]), float(vec[1]), float(vec[2])
        out = {"nelbo_block_mean": s1 / n, "nelbo_block_var": (s2 - s1 * s1 / n) / max(n - 1.0, 1.0)}
        for b in range(buckets):
            count = float(vec[3 + buckets + b])
            if count:
                out[f"loss_t/{b / buckets:.1f}-{(b + 1) / buckets:.1f}"] = float(vec[3 + b]) / count
        return out

    def _mean_over_data_parallel(self, reports: list[dict]) -> float:
        """The step's loss averaged over micro-batches and data-parallel ranks (meaningful on the last stage)."""
        if not reports:
            return float("nan")
        local = torch.stack([r["loss"].float() for r in reports]).mean().reshape(1).to(self.device)
        if self.dp > 1:
            torch.distributed.all_reduce(local, group=parallel_state.get_data_parallel_group())
            local /= self.dp
        return float(local)

    # ------------------------------------------------------------------ evaluation
    def _val_rows_scored(self) -> int:
        """Validation rows every evaluation scores: the first ``train.eval_rows`` of the split (0 = all of it),
        whatever the micro-batch size and the TP/PP/DP layout."""
        n_rows, want = len(self.val_rows), self.cfg.train.eval_rows
        if n_rows == 0:
            raise ValueError("the validation split is empty; raise data.val_docs")
        return min(n_rows, want) if want else n_rows

    def _val_micro_batches(
        self, n_rows: int, window: ClipWindow, resample: bool = False, noise_draw: int = 0
    ) -> list[MicroBatch]:
        """This rank's fixed-noise micro-batches over validation rows [0, n_rows): pass i covers rows
        [i*mb*dp, (i+1)*mb*dp), rank r its r-th slice of mb rows. The last pass is padded with weight-0 rows, so every
        rank runs ceil(n_rows / (mb*dp)) equal micro-batches (no collective waits on a rank with fewer)."""
        mb = self.cfg.train.micro_batch_size
        per_pass = mb * self.dp
        starts = range(self.ctx.dp_rank * mb, math.ceil(n_rows / per_pass) * per_pass, per_pass)
        return [
            self.batches.eval_batch(
                self.val_rows, np.arange(s, s + mb), n_rows, window, resample=resample, noise_draw=noise_draw
            )
            for s in starts
        ]

    @contextlib.contextmanager
    def _eval_weights(self):
        """Evaluate with the EMA weights (as the reference does), restoring the training weights afterwards."""
        self.model.eval()
        if self.ema is not None:
            self.ema.swap_into(self.named)
        try:
            with torch.no_grad():
                yield
        finally:
            if self.ema is not None:
                self.ema.swap_into(self.named)

    def evaluate(self, noise_draw: int = 0, window: ClipWindow | None = None) -> dict:
        """Validation NELBO (window [1e-3, 1] unless ``window``, fixed noise) with EMA weights, token-weighted over
        the first ``train.eval_rows`` rows (every one of them, identical under any batch size and layout); with
        ``diffusion.clip_search`` also the clip-window search. ``noise_draw`` selects another fixed noise stream."""
        with self._eval_weights():
            micro = self._val_micro_batches(self._val_rows_scored(), window or ClipWindow(), noise_draw=noise_draw)
            reports = self._run_schedule(micro, forward_only=True)
            search = self.clip_search() if self._clip_search_due() else {}
        # "tokens" counts real tokens of real rows only (MicroBatch.num_tokens): padding rows and --pad padding weigh 0
        sums = torch.tensor(
            [sum(float(r["weighted_sum"]) for r in reports), sum(float(r["tokens"]) for r in reports)],
            dtype=torch.float64,
            device=self.device,
        )
        if self.dp > 1:
            torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        if not self.ctx.is_last_stage:
            return {}
        nelbo = float(sums[0] / sums[1])
        return {"val_nelbo": nelbo, "val_ppl": math.exp(min(nelbo, 50.0)), **search}

    def _clip_search_due(self) -> bool:
        """At evaluations after step 0 (the reference skips its sanity-check validation: the variance of an
        untrained model says nothing about the schedule), every ``clip_search_interval`` steps if set."""
        d = self.cfg.diffusion
        return (
            d.clip_search and self.step > 0 and (not d.clip_search_interval or self.step % d.clip_search_interval == 0)
        )

    def clip_search(self) -> dict:
        """Score every window of the grid by the variance of per-block NELBO estimates on the validation batches
        (gathered over data-parallel ranks), pick the minimiser on the last stage, share it with every rank and, unless
        ``fix_clipping``, train with it from now on. Call inside ``_eval_weights``."""
        d = self.cfg.diffusion
        windows = clip_window_grid(d.clip_search_widths, d.clip_search_delta, self.cfg.model.block_size)
        n_rows = min(d.clip_search_rows or self._val_rows_scored(), self._val_rows_scored())

        def estimates(window: ClipWindow) -> list[torch.Tensor]:
            micro = self._val_micro_batches(n_rows, window, resample=d.resample)
            reports = self._run_schedule(micro, forward_only=True)
            return [self._gathered_block_losses(r, b) for r, b in zip(reports, micro)]

        if self.ctx.is_last_stage:
            best, scores = search_clip_window(windows, estimates)
            choice = torch.tensor([windows.index(best)], device=self.device)
        else:  # earlier stages run the same forward passes for the pipeline; the last stage decides
            for window in windows:
                estimates(window)
            scores, choice = {}, torch.zeros(1, dtype=torch.long, device=self.device)
        if self.ctx.pp > 1:
            torch.distributed.broadcast(
                choice,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        best = windows[int(choice.item())]
        if not d.fix_clipping:
            self.batches.window = best
        return {
            "clip_window": [best.eps_min, best.eps_max],
            **{f"clip_var/{label}": score for label, score in scores.items()},
        }

    def _gathered_block_losses(self, report: dict, batch: MicroBatch) -> torch.Tensor:
        """A validation report's per-block estimates over all data-parallel ranks, without the blocks that hold no
        real token: those of padding rows of a short last batch, and with padded data those of padding only (the
        keep mask is gathered like the estimates, so the gathers match on every rank)."""
        keep = report.get("block_keep", torch.ones_like(report["block_losses"], dtype=torch.bool))
        if batch.valid is not None:
            keep = keep & batch.valid[:, None]
        losses = self._gather_data_parallel(report["block_losses"])
        return losses[self._gather_data_parallel(keep.to(torch.uint8)).bool()]  # gloo gathers no bool tensors

    def _gather_data_parallel(self, t: torch.Tensor) -> torch.Tensor:
        if self.dp == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.dp)]
        torch.distributed.all_gather(parts, t.contiguous(), group=parallel_state.get_data_parallel_group())
        return torch.cat(parts)

    # ------------------------------------------------------------------ checkpoints
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
        """Checkpoint the current step (collective). Refuses to publish non-finite weights or EMA (every rank checks
        its shard; all agree), and turns a failed write into TrainingStopped naming the intact step."""
        c = self.cfg.checkpoint
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
                f"non-finite weights at step {self.step} ({', '.join(bad[:4])}): checkpoint not written; {intact}"
            )
        meta = {
            "config": self.cfg.to_dict(),
            "consumed_samples": self.step * self.cfg.train.global_batch_size,
            "skipped_steps": self.skipped_steps,
            "data": {"stream": "ShuffledStream", **self.data_info},
            "tokenizer": self.tokenizer.name,
            "vocab_size": self.tokenizer.vocab_size,
            "clip_window": [self.batches.window.eps_min, self.batches.window.eps_max],
            "mask_token_id": self.tokenizer.mask_token_id,
        }
        try:
            path = ckpt.save_checkpoint(
                c.dir,
                self.step,
                self.layout,
                model_state=model_state,
                optim_state={"engine": self.engine.state_dict(), "step": self.step},
                metadata=meta,
                keep=c.keep,
                verified=self.verified,
                resumed_step=self.resumed_step,
                intact_step=self.intact_step,
            )
        except ckpt.CheckpointSaveError as exc:
            raise TrainingStopped(str(exc)) from None
        self.verified.add(path.name)
        self.intact_step = self.step
        self.logger.info(f"saved checkpoint {path}")

    def _read_resume_state(self, path) -> dict:
        """Everything a same-layout (or resharded) resume needs from ``path``, read into memory and verified (sizes,
        sha256, finite tensors) before any of it touches the model. Raises CheckpointDamaged for damage and
        CheckpointError for a checkpoint this run cannot continue (other shapes, layout)."""
        c = self.cfg.checkpoint
        meta = ckpt.read_metadata(path)
        for note in check_resume(
            path, meta, self.cfg, self.data_info, self.tokenizer.vocab_size, self.tokenizer.mask_token_id
        ):
            self.logger.info(note)
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
                    for r in range(self.dp)
                ]
            )
            state["rng"] = ckpt.load_file(path / self.layout.rng_file(), meta=meta)
        else:
            state["weights"], state["ema"] = ckpt.load_resharded(path, meta, self.named, self.canonical)
        return state

    def maybe_resume(self) -> None:
        """Resume from the newest intact checkpoint (see ckpt.resume_candidates): a damaged one (any rank's files)
        is named in the log and the next older one tried; none intact raises CheckpointError. Ranks agree on each
        candidate before loading anything, so every rank resumes from the same step."""
        c = self.cfg.checkpoint
        candidates, notes = ckpt.resume_candidates(c.resume, c.dir)
        for note in notes:
            self.logger.info(f"warning: {note}")
        if not candidates:
            if c.init_from:
                self.init_from(c.init_from)
            return
        damage: list[str] = []
        for path in candidates:
            try:
                state, problem = self._read_resume_state(path), None
            except ckpt.CheckpointDamaged as exc:
                state, problem = None, str(exc)
            problems = sorted({p for p in ckpt.all_ranks(problem) if p is not None})
            if not problems:
                break
            damage.append(f"{path.name}: {problems[0]}")
            self.logger.info(f"warning: checkpoint {path} is damaged and not used: {'; '.join(problems)}")
        else:
            where = Path(c.resume) if c.resume != "auto" else Path(c.dir)
            raise ckpt.CheckpointError(
                f"no intact checkpoint in {where} ({'; '.join(damage)}); restore one, or set "
                f"checkpoint.resume=none with a new checkpoint.dir to start over"
            )
        meta, same_layout = state["meta"], state["same_layout"]
        self.load_weights(state["weights"], source=path)
        ema = state["ema"]
        if self.ema is not None and ema is not None:
            by_canonical = {self.canonical[n]: n for n in self.named}
            self.ema.load_state_dict(
                {
                    "decay": ema["decay"],
                    "num_updates": ema["num_updates"],
                    "shadow": {by_canonical[k]: v for k, v in ema["shadow"].items()},
                }
            )
        zero = state["zero"]
        if same_layout and not zero:
            self.engine.load_state_dict([o["engine"] for o in state["optim"]])
        if same_layout:
            ckpt.set_rng_state(state["rng"])
        self.step = meta["step"]
        self.resumed_step = self.intact_step = self.step
        self.verified.add(path.name)
        self.skipped_steps = meta.get("skipped_steps", 0)
        if "clip_window" in meta and self.cfg.diffusion.clip_search and not self.cfg.diffusion.fix_clipping:
            self.batches.window = ClipWindow(*meta["clip_window"])  # the searched window survives a restart
        how = "" if same_layout else f" (weights resharded from layout {meta['layout']}, fresh optimizer state)"
        if zero and same_layout:
            how = f" (weights and EMA loaded, fresh optimizer state: ZeRO stage {zero[0]} -> {zero[1]})"
        self.logger.info(f"resumed from {path} at step {self.step}{how}")

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor], source) -> None:
        """Copy canonical-named tensors (this rank's shards) into the model; the names must match exactly."""
        by_canonical = {self.canonical[n]: n for n in self.named}
        if set(weights) != set(by_canonical):
            raise ckpt.CheckpointError(
                f"{source}: model tensors do not match this model "
                f"(differing: {sorted(set(weights) ^ set(by_canonical))[:4]})"
            )
        for cname, tensor in weights.items():
            self.named[by_canonical[cname]].copy_(tensor)
        self.engine.guard.bounds = None  # the update bound is re-measured for the new weights

    def init_from(self, spec: str) -> None:
        """Start from another run's weights, resharded to this layout; the step and optimizer start fresh.

        ``checkpoint.init_from_weights`` picks the pretrain's EMA (default; the reference fine-tunes from the released
        EMA weights) or its raw weights. Both the model and this run's EMA start from them, so the step-0 evaluation
        scores exactly those weights. Raises CheckpointError for another architecture or tokenizer, or when ema is
        asked of a run that kept no EMA."""
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
        if meta.get("tokenizer") != self.tokenizer.name:
            raise ckpt.CheckpointError(
                f"checkpoint.init_from {path} uses tokenizer {meta.get('tokenizer')!r}, this "
                f"run {self.tokenizer.name!r}"
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
            self.ema = EMA(self.named, self.cfg.optim.ema)
        self.logger.info(
            f"initialised weights from the {'EMA' if which == 'ema' else 'raw'} weights of {path} "
            f"(step {meta['step']}, block size {saved['block_size']} -> {self.cfg.model.block_size}); "
            f"training starts at step 0"
        )

    # ------------------------------------------------------------------ the loop
    def train(self, stop: StopSignal | None = None) -> dict:
        cfg, t = self.cfg, self.cfg.train
        tokens_per_step = t.global_batch_size * cfg.model.seq_len
        last_eval: dict = {}
        stop = stop or StopSignal()
        window_start, window_steps = time.time(), 0
        watch = VarianceWatch(cfg.log.variance_warn_factor)
        while self.step < t.max_steps:
            record = self.train_step()
            window_steps += 1
            if "nelbo_block_var" in record:
                warning = watch.update(record["nelbo_block_var"])
                if warning:
                    self.logger.info(f"warning: {warning} (step {self.step})")
                if watch.high:
                    record["variance_warning"] = True
            if self.bad_steps >= t.max_bad_steps:
                raise TrainingStopped(
                    f"{self.bad_steps} consecutive non-finite steps at step {self.step}; stopping. "
                    f"The last checkpoint is intact; lower optim.lr or check the data"
                )
            done = self.step >= t.max_steps
            is_eval = done or (t.eval_interval and self.step % t.eval_interval == 0)
            if self.step % cfg.log.interval == 0 or is_eval or done:
                elapsed = time.time() - window_start
                record.update(
                    step=self.step,
                    tokens_per_s=window_steps * tokens_per_step / max(elapsed, 1e-9),
                    consumed_samples=self.step * t.global_batch_size,
                )
                if is_eval:
                    last_eval = self.evaluate()
                    record.update(last_eval)
                self.logger.log(record)
                window_start, window_steps = time.time(), 0
            if cfg.checkpoint.dir and (done or (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0)):
                self.save()
            elif not done and stop.agreed(self.device):
                if cfg.checkpoint.dir:
                    self.save()
                raise PreemptionRequested(
                    f"stop signal received: checkpoint saved at step {self.step}; requeue the job to resume"
                )
        return last_eval

    def initial_eval(self) -> dict:
        """Validation at step 0 (before any update), logged like any other eval."""
        result = self.evaluate()
        self.logger.log({"step": self.step, "loss": None, **result})
        return result
