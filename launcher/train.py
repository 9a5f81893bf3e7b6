"""``python -m launcher.train --config configs/X.yaml [section.key=value ...]``

The same command runs as a single process, under ``torchrun`` and under ``srun``: ranks come from the
environment (see bd3_megatron.parallel.state). Bad input ends the run with one ``error:`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launcher.train", description="Train a BD3-LM.")
    p.add_argument("--config", default=None, help="YAML recipe (default: built-in defaults)")
    p.add_argument("--resume", default=None, help="auto | none | a checkpoint directory (= checkpoint.resume)")
    p.add_argument("--no-sample", action="store_true", help="skip sampling after training")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.block_size=8")
    return p.parse_args(argv)


def print_samples(trainer, cfg) -> None:
    from bd3_megatron.sampling.block_sampler import sample

    s, ctx = cfg.sample, trainer.ctx
    if s.num_samples == 0 or ctx.dp_rank != 0:  # the tensor-parallel ranks of one replica sample together
        return
    if ctx.pp > 1 or cfg.model.mode != "bd3":
        if ctx.is_logging_rank:
            print("samples: skipped (in-training sampling is for bd3 models with pp=1; for pp>1 sample from the "
                  "checkpoint with tools/sample.py)")
        return
    model = trainer.model
    model.eval()
    if trainer.ema is not None:
        trainer.ema.swap_into(trainer.named)
    try:
        def logits_fn(xt, x0, start, end):
            with trainer.ctx.runtime.autocast(trainer.dtype):
                return model.block_logits(xt, x0, start, end)

        t0 = time.time()
        tokens = sample(logits_fn, num_samples=s.num_samples, length=s.length or cfg.model.seq_len,
                        block_size=cfg.model.block_size, context_len=cfg.model.seq_len,
                        mask_id=trainer.tokenizer.mask_token_id, steps=s.steps, nucleus_p=s.nucleus_p, seed=s.seed,
                        device=trainer.device)
        took = time.time() - t0
    finally:
        if trainer.ema is not None:
            trainer.ema.swap_into(trainer.named)
    if not ctx.is_logging_rank:
        return
    print(f"\n=== {s.num_samples} samples ({tokens.shape[1]} tokens, block size {cfg.model.block_size}, "
          f"{s.steps} steps/block, {took:.1f}s) ===", flush=True)
    for i, row in enumerate(tokens.tolist()):
        print(f"--- sample {i} ---\n{trainer.tokenizer.decode(row)}\n", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bd3_megatron.cli import quiet_library_warnings

    quiet_library_warnings()
    from bd3_megatron.config import ConfigError, load_config
    from bd3_megatron.training.checkpoint import CheckpointError

    try:
        overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
        cfg = load_config(args.config, overrides)
        from bd3_megatron.parallel import state
        from bd3_megatron.training.trainer import PreemptionRequested, Trainer, TrainingStopped

        ctx = state.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed, cfg.parallel.device)
        try:
            trainer = Trainer(cfg, ctx)
            info = trainer.data_info
            trainer.logger.info(
                f"bd3-megatron: {cfg.model.num_layers}x{cfg.model.hidden_size} (heads {cfg.model.num_heads}), "
                f"L={cfg.model.seq_len} L'={cfg.model.block_size}, {sum(p.numel() for p in trainer.model.parameters())/1e6:.1f}M "
                f"params/rank, device {ctx.runtime.device}, tp={ctx.tp} pp={ctx.pp} dp={ctx.dp}; data "
                f"{info['train_rows']} train / {info['val_rows']} val rows of {cfg.data.path} ({cfg.data.tokenizer})")
            trainer.maybe_resume()
            if trainer.step == 0:
                trainer.initial_eval()
            trainer.train()
            if not args.no_sample and cfg.sample.after_train:
                print_samples(trainer, cfg)
            trainer.logger.close()
        finally:
            state.shutdown()
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except PreemptionRequested as exc:
        if os.environ.get("RANK", "0") == "0":  # one line per job, not one per rank
            print(f"preempted: {exc}", flush=True)
        return 0
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
