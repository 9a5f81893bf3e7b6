"""The training run: builds the components, then the loop — step, log, evaluate, checkpoint, honour a stop request.

Components (each usable alone): :class:`~bd3_megatron.training.step.TrainStep` (forward, backward, update),
:class:`~bd3_megatron.training.evaluator.Evaluator` (validation NELBO, clip-window search),
:class:`~bd3_megatron.training.checkpointer.Checkpointer` (save, resume, reshard, init_from). They share the run's
:class:`~bd3_megatron.training.state.TrainState` and the model, its engine and EMA built here.
"""

from __future__ import annotations

import signal
import time

import torch

from bd3_megatron.config import Config, validate_layout
from bd3_megatron.diffusion.schedule import ClipWindow
from bd3_megatron.model.build import build_model
from bd3_megatron.parallel.state import ParallelContext
from bd3_megatron.training.batches import BatchMaker
from bd3_megatron.training.checkpointer import Checkpointer, TrainingStopped
from bd3_megatron.training.engine import DeepSpeedEngine
from bd3_megatron.training.evaluator import Evaluator
from bd3_megatron.training.metrics import MetricsLogger, VarianceWatch
from bd3_megatron.training.optim import EMA
from bd3_megatron.training.state import TrainState
from bd3_megatron.training.step import TrainStep

__all__ = ["PreemptionRequested", "StopSignal", "Trainer", "TrainingStopped"]


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


class Trainer:
    """One training run of ``cfg`` on this rank of ``ctx``: data, model (megatron-core, any TP/PP), DeepSpeed engine
    (any ZeRO stage), EMA, logger, and the three components. Raises ConfigError for a layout the config cannot run,
    FileNotFoundError/ValueError for bad data, CheckpointError for an unwritable checkpoint.dir."""

    def __init__(self, cfg: Config, ctx: ParallelContext):
        from data_pipeline.tokenizers import get_tokenizer
        from data_pipeline.training_data import open_training_data

        self.cfg, self.ctx = cfg, ctx
        self.dp = validate_layout(cfg, ctx.world_size)
        t = cfg.train
        self.device = ctx.runtime.device
        self.dtype = ctx.runtime.compute_dtype(cfg.train.precision)
        self.state = TrainState()
        self.tokenizer = get_tokenizer(cfg.data.tokenizer)
        self.train_rows, self.val_rows, self.data_info, self.stream = open_training_data(
            cfg.data, self.tokenizer, cfg.model.seq_len, seed=t.seed, rank=ctx.rank
        )
        micro_batches = t.global_batch_size // (t.micro_batch_size * self.dp)
        model = build_model(cfg, ctx, self.tokenizer.vocab_size, self.tokenizer.mask_token_id)
        self.engine = DeepSpeedEngine(model, cfg, ctx, self.dp, micro_batches, bf16=self.dtype == torch.bfloat16)
        self.model = self.engine.module
        self.named = dict(self.model.named_parameters())
        self.ema = EMA(self.named, cfg.optim.ema) if cfg.optim.ema > 0 else None
        self.batches = BatchMaker(cfg, self.tokenizer.mask_token_id, self.device)
        self.logger = MetricsLogger(
            cfg.log.dir,
            ctx.is_logging_rank,
            progress=cfg.log.progress,
            max_steps=t.max_steps,
            wandb_project=cfg.log.wandb_project if cfg.log.wandb else None,
            wandb_mode=cfg.log.wandb_mode,
            config=cfg.to_dict(),
        )
        run_info = {
            "data": self.data_info,
            "tokenizer": self.tokenizer.name,
            "vocab_size": self.tokenizer.vocab_size,
            "mask_token_id": self.tokenizer.mask_token_id,
        }
        self.checkpointer = Checkpointer(
            cfg, ctx, self.engine, self.ema, self.state, self.batches, run_info, self.logger.info
        )
        self.train_step = TrainStep(cfg, ctx, self.engine, self.batches, self.stream, self.ema, self.state, self.dtype)
        self.evaluator = Evaluator(cfg, ctx, self.model, self.batches, self.val_rows, self.dtype, self.ema)

    # the run's progress and the components' entry points, as the launcher, tools and tests use them
    @property
    def step(self) -> int:
        return self.state.step

    @property
    def bad_steps(self) -> int:
        return self.state.bad_steps

    @property
    def canonical(self) -> dict[str, str]:
        return self.checkpointer.canonical

    def evaluate(self, noise_draw: int = 0, window: ClipWindow | None = None) -> dict:
        return self.evaluator.evaluate(self.state.step, noise_draw=noise_draw, window=window)

    def save(self) -> None:
        self.checkpointer.save()

    def maybe_resume(self) -> None:
        self.checkpointer.maybe_resume()

    def load_weights(self, weights: dict[str, torch.Tensor], source) -> None:
        self.checkpointer.load_weights(weights, source)

    def initial_eval(self) -> dict:
        """Validation at step 0 (before any update), logged like any other eval."""
        result = self.evaluate()
        self.logger.log({"step": self.state.step, "loss": None, **result})
        return result

    # ------------------------------------------------------------------ the loop
    def train(self, stop: StopSignal | None = None) -> dict:
        """Train to ``train.max_steps``: each step, then at step boundaries the log (every ``log.interval``), the
        evaluation (every ``train.eval_interval`` and at the end), the checkpoint (``checkpointer.due``), and a stop
        request (checkpoint, then PreemptionRequested). Returns the last evaluation's figures. Raises TrainingStopped
        after ``train.max_bad_steps`` consecutive non-finite steps."""
        cfg, t, state = self.cfg, self.cfg.train, self.state
        tokens_per_step = t.global_batch_size * cfg.model.seq_len
        last_eval: dict = {}
        stop = stop or StopSignal()
        window_start, window_steps = time.time(), 0
        watch = VarianceWatch(cfg.log.variance_warn_factor)
        while state.step < t.max_steps:
            record = self.train_step()
            window_steps += 1
            if "nelbo_block_var" in record:
                warning = watch.update(record["nelbo_block_var"])
                if warning:
                    self.logger.info(f"warning: {warning} (step {state.step})")
                if watch.high:
                    record["variance_warning"] = True
            if state.bad_steps >= t.max_bad_steps:
                raise TrainingStopped(
                    f"{state.bad_steps} consecutive non-finite steps at step {state.step}; stopping. "
                    f"The last checkpoint is intact; lower optim.lr or check the data"
                )
            done = state.step >= t.max_steps
            is_eval = done or (t.eval_interval and state.step % t.eval_interval == 0)
            if state.step % cfg.log.interval == 0 or is_eval:
                elapsed = time.time() - window_start
                record.update(
                    step=state.step,
                    tokens_per_s=window_steps * tokens_per_step / max(elapsed, 1e-9),
                    consumed_samples=state.step * t.global_batch_size,
                )
                if is_eval:
                    last_eval = self.evaluate()
                    record.update(last_eval)
                self.logger.log(record)
                window_start, window_steps = time.time(), 0
            if self.checkpointer.due(done):
                self.save()
            elif not done and stop.agreed(self.device):
                self.save()  # nothing without checkpoint.dir
                raise PreemptionRequested(
                    f"stop signal received: checkpoint saved at step {state.step}; requeue the job to resume"
                )
        return last_eval
