"""Functions run on each rank by tests/dist_harness.py (module level so the forkserver can import them)."""

from __future__ import annotations

import contextlib
import io

import torch

BASE = {
    "model": {"num_layers": 4, "hidden_size": 32, "num_heads": 4, "seq_len": 16, "block_size": 4, "dropout": 0.0},
    "data": {"path": "embedded:sotu", "tokenizer": "bert-base-uncased", "val_docs": 4},
    "train": {
        "max_steps": 3,
        "seed": 3,
        "micro_batch_size": 2,
        "global_batch_size": 8,
        "eval_interval": 0,
        "eval_rows": 5,
    },
    "optim": {"lr": 1e-3, "warmup_steps": 0, "grad_clip": 1.0, "ema": 0.0},
    "checkpoint": {"dir": None},
    "sample": {"after_train": False},
}


def make_config(layout: tuple[int, int, int, int], cache_dir: str, log_dir: str, extra: list[str] | None = None):
    from bd3_megatron.config import config_from_dict

    tp, pp, _dp, zero = layout
    overrides = [
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"parallel.zero_stage={zero}",
        "parallel.device=cpu",
        f"data.cache_dir={cache_dir}",
        f"log.dir={log_dir}",
        "log.progress=false",
        *(extra or []),
    ]
    return config_from_dict(BASE, overrides)


@contextlib.contextmanager
def trainer_for(layout, cache_dir: str, log_dir: str, extra: list[str] | None = None):
    """A Trainer on this rank's process groups for ``layout``; groups are torn down afterwards."""
    from bd3_megatron.parallel import state
    from bd3_megatron.training.trainer import Trainer

    cfg = make_config(layout, cache_dir, log_dir, extra)
    ctx = state.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed, "cpu")
    try:
        yield Trainer(cfg, ctx)
    finally:
        state.shutdown()


def gather_weights(trainer) -> dict:
    """This rank's canonical-named shards, with how they are split (merged by the test)."""
    return {
        "tp_rank": trainer.ctx.tp_rank,
        "pp_rank": trainer.ctx.pp_rank,
        "dp_rank": trainer.ctx.dp_rank,
        "tp": trainer.ctx.tp,
        "params": {trainer.canonical[n]: p.detach().clone() for n, p in trainer.named.items()},
        "partition": {
            trainer.canonical[n]: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
            for n, p in trainer.named.items()
        },
    }


def train_layout(rank: int, world: int, layout, cache_dir: str, log_dir: str, steps: int, extra=None) -> dict:
    with trainer_for(layout, cache_dir, log_dir, extra) as trainer:
        records = [trainer.train_step() for _ in range(steps)]
        val = trainer.evaluate()
        out = gather_weights(trainer)
        out.update(
            losses=[r["loss"] for r in records],
            grad_norms=[r["grad_norm"] for r in records],
            grad_vars=[r.get("grad_var") for r in records],
            val=val,
            last_stage=trainer.ctx.is_last_stage,
        )
        return out


def train_and_save(rank: int, world: int, layout, cache_dir: str, log_dir: str, steps: int, extra=None) -> dict:
    """:func:`train_layout`, then a checkpoint (``checkpoint.dir`` must be among ``extra``)."""
    with trainer_for(layout, cache_dir, log_dir, extra) as trainer:
        records = [trainer.train_step() for _ in range(steps)]
        val = trainer.evaluate()
        trainer.save()
        out = gather_weights(trainer)
        out.update(losses=[r["loss"] for r in records], val=val, last_stage=trainer.ctx.is_last_stage)
        return out


VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias")


def merge_full_weights(results: list[dict], vocab_size: int = 30522) -> dict[str, torch.Tensor]:
    """Full canonical weights from the data-parallel-rank-0 shards of every (tp, pp) position. Vocabulary padding
    rows (their count depends on tp) are dropped: they are never read nor trained."""
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    partition: dict[str, int | None] = {}
    for r in results:
        if r["dp_rank"] != 0:
            continue
        for name, t in r["params"].items():
            pieces.setdefault(name, {})[r["tp_rank"]] = t
            partition[name] = r["partition"][name]
    full = {}
    for name, by_tp in pieces.items():
        dim = partition[name]
        full[name] = by_tp[0] if dim is None else torch.cat([by_tp[i] for i in sorted(by_tp)], dim=dim)
        if name in VOCAB_TENSORS:
            full[name] = full[name][:vocab_size]
    return full


def save_then_continue(rank: int, world: int, layout, cache_dir: str, run_dir: str) -> dict:
    """Train 2 steps, checkpoint, train 2 more (the uninterrupted reference for resume)."""
    with trainer_for(
        layout, cache_dir, run_dir + "/log", [f"checkpoint.dir={run_dir}/ckpt", "model.dropout=0.1", "optim.ema=0.99"]
    ) as trainer:
        for _ in range(2):
            trainer.train_step()
        trainer.save()
        return _continue_two_steps(trainer)


def _continue_two_steps(trainer) -> dict:
    step = trainer.step
    after = [trainer.train_step() for _ in range(2)]
    return {
        "step": step,
        "losses": [r["loss"] for r in after],
        "norms": [r["grad_norm"] for r in after],
        "last_stage": trainer.ctx.is_last_stage,
        "params": gather_weights(trainer)["params"],
    }


def resume_and_continue(rank: int, world: int, layout, cache_dir: str, run_dir: str, extra=None) -> dict:
    with trainer_for(
        layout,
        cache_dir,
        run_dir + "/log2",
        [f"checkpoint.dir={run_dir}/ckpt", "model.dropout=0.1", "optim.ema=0.99", *(extra or [])],
    ) as trainer:
        trainer.maybe_resume()
        return _continue_two_steps(trainer)


def save_and_eval(rank: int, world: int, layout, cache_dir: str, run_dir: str) -> dict:
    with trainer_for(
        layout, cache_dir, run_dir + "/log", [f"checkpoint.dir={run_dir}/ckpt", "optim.ema=0.9"]
    ) as trainer:
        for _ in range(2):
            trainer.train_step()
        trainer.save()
        return {"val": trainer.evaluate(), "last_stage": trainer.ctx.is_last_stage}


def reshard_and_eval(rank: int, world: int, layout, cache_dir: str, run_dir: str) -> dict:
    with trainer_for(
        layout,
        cache_dir,
        run_dir + "/log3",
        [f"checkpoint.dir={run_dir}/ckpt", "optim.ema=0.9", "checkpoint.reshard=true"],
    ) as trainer:
        trainer.maybe_resume()
        return {"val": trainer.evaluate(), "last_stage": trainer.ctx.is_last_stage, "step": trainer.step}


def nan_steps(rank: int, world: int, layout, cache_dir: str, run_dir: str) -> dict:
    """Poison the loss of steps 1 and 2 (NaN activations from the head): they must be skipped, weights untouched,
    then two more bad steps in a row stop training with TrainingStopped."""
    from bd3_megatron.training.trainer import TrainingStopped

    poison = {"on": False}
    with trainer_for(layout, cache_dir, run_dir + "/log", ["train.max_bad_steps=2", "train.max_steps=10"]) as trainer:
        if trainer.ctx.is_last_stage:
            trainer.model.output_layer.register_forward_hook(
                lambda mod, inp, out: (
                    out._replace(ce=out.ce * float("nan"), nelbo_sum=out.nelbo_sum * float("nan"))
                    if poison["on"]
                    else out
                )
            )
        trainer.train_step()
        before = {n: p.detach().clone() for n, p in trainer.named.items()}
        poison["on"] = True
        rec = trainer.train_step()
        unchanged = all(torch.equal(before[n], p) for n, p in trainer.named.items())
        poison["on"] = False
        good = trainer.train_step()
        poison["on"] = True
        stopped = ""
        try:
            trainer.train()
        except TrainingStopped as exc:
            stopped = str(exc)
        return {
            "skipped": rec["skipped_steps"],
            "unchanged": unchanged,
            "good_loss": good["loss"],
            "stopped": stopped,
            "last_stage": trainer.ctx.is_last_stage,
        }


def clip_search_once(rank: int, world: int, layout, cache_dir: str, log_dir: str) -> dict:
    """One training step, then the clip-window search; returns the chosen window and the scores."""
    extra = [
        "diffusion.clip_search=true",
        "diffusion.clip_search_widths=[0.5,0.8]",
        "diffusion.clip_search_delta=0.25",
        "train.eval_rows=16",
    ]
    with trainer_for(layout, cache_dir, log_dir, extra) as trainer:
        trainer.train_step()
        result = trainer.evaluate()
        return {
            "result": result,
            "window": [trainer.batches.window.eps_min, trainer.batches.window.eps_max],
            "last_stage": trainer.ctx.is_last_stage,
        }


def count_step_collectives(rank: int, world: int, layout, cache_dir: str, log_dir: str) -> dict:
    """One warm-up step, then every collective of one more training step counted by bench/scaling_model.py's
    CollectiveCounter, with the masked-token count of each of that step's micro-batches (the TP head's traffic)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from bench.scaling_model import CollectiveCounter

    with trainer_for(layout, cache_dir, log_dir) as trainer:
        trainer.train_step()  # DeepSpeed's first step sets up buffers; the steady state is what scales
        masked = [int(b.masked.sum()) for b in trainer.train_step.micro_batches_of(trainer.step)]
        groups = {
            name: tuple(dist.get_process_group_ranks(get()))
            for name, get in (
                ("tp", ps.get_tensor_model_parallel_group),
                ("dp", ps.get_data_parallel_group),
                ("pp", ps.get_pipeline_model_parallel_group),
            )
        }
        with CollectiveCounter(groups) as counter:
            trainer.train_step()
        return {"rank": rank, "pp_rank": trainer.ctx.pp_rank, "masked": masked, "calls": counter.calls}


def overflow_steps(rank: int, world: int, layout, cache_dir: str, run_dir: str) -> dict:
    """Weight decay 1e43 after a first ordinary step: decoupled decay multiplies every weight by (1 - lr*wd) ~ -1e40,
    so each update would
    overflow the weights while the gradients stay finite. Every such update must leave parameters and optimizer state
    bit for bit as they were, until train.max_bad_steps stops training; with the decay back to 0 the next step is
    applied."""

    def snapshot(trainer):
        params = {n: p.detach().clone() for n, p in trainer.named.items()}
        buf = io.BytesIO()
        torch.save(trainer.engine.state_dict()["optimizer"], buf)  # (global_steps counts skipped steps too)
        return params, buf.getvalue()

    out = {}

    def set_decay(trainer, wd: float) -> None:
        for group in trainer.engine.guard._inner().param_groups:
            group["weight_decay"] = wd

    with trainer_for(layout, cache_dir, run_dir + "/log", ["optim.warmup_steps=0", "train.max_bad_steps=3"]) as trainer:
        trainer.train_step()  # an ordinary first step: the Adam moments exist from here on
        set_decay(trainer, 1e43)
        kept, grads_finite = True, True
        while trainer.bad_steps < trainer.cfg.train.max_bad_steps:
            before = snapshot(trainer)
            rec = trainer.train_step()
            grads_finite &= rec["grad_norm"] == rec["grad_norm"] and rec["grad_norm"] < float("inf")
            after = snapshot(trainer)
            kept &= after[1] == before[1] and all(torch.equal(after[0][n], t) for n, t in before[0].items())
        set_decay(trainer, 0.0)
        before = snapshot(trainer)[0]
        rec = trainer.train_step()
        moved = max(float((p.detach() - before[n]).abs().max()) for n, p in trainer.named.items())
        out.update(
            refused=rec["skipped_steps"],
            kept=kept,
            grads_finite=grads_finite,
            moved=moved,
            finite=all(bool(torch.isfinite(p).all()) for p in trainer.named.values()),
            exact_steps=trainer.engine.guard.exact_steps,
        )
    return out


def guarded_normal_steps(rank: int, world: int, layout, cache_dir: str, run_dir: str) -> dict:
    """Three ordinary steps: the guard's host bound must prove each finite (no exact path) and hold the weights."""
    with trainer_for(layout, cache_dir, run_dir + "/log2", ["optim.warmup_steps=0"]) as trainer:
        for _ in range(3):
            trainer.train_step()
        return {
            "exact_steps": trainer.engine.guard.exact_steps,
            "bound": trainer.engine.guard.bounds,
            "measured": trainer.engine.guard.measure(),
        }
