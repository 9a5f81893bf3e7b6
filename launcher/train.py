"""``python -m launcher.train --config configs/X.yaml [section.key=value ...]``

The same command runs as a single process, under ``torchrun`` and under ``srun``: ranks come from the
environment (see bd3_megatron.parallel.state). Bad input ends the run with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launcher.train", description="Train a BD3-LM.")
    p.add_argument("--config", default=None, help="YAML recipe (default: built-in defaults)")
    p.add_argument("--resume", default=None, help="auto | none | a checkpoint directory (= checkpoint.resume)")
    p.add_argument("--no-sample", action="store_true", help="skip sampling after training")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.block_size=8")
    return p.parse_intermixed_args(argv)  # key=value overrides may stand between the flags


def print_samples(trainer, cfg) -> None:
    """Samples of the final checkpoint from the product sampler (plain-PyTorch BD3Net, exact KV cache), exactly as
    ``tools/convert.py`` + ``tools/sample.py`` would draw them; any TP/PP layout, on global rank 0 alone."""
    from bd3_megatron.checkpoint.from_training import read_input
    from bd3_megatron.modes import get_mode
    from bd3_megatron.sampling.kv_sampler import SampleOptions, generate
    from bd3_megatron.sampling.net import build_net

    s, ctx = cfg.sample, trainer.ctx
    if s.num_samples == 0 or ctx.rank != 0:
        return
    block_sampler = get_mode(cfg.model.mode).block_sampler
    if not block_sampler or not cfg.checkpoint.dir:
        why = (
            "they are drawn from the final checkpoint (set checkpoint.dir)"
            if block_sampler
            else f"model.mode={cfg.model.mode} is not a block diffusion model"
        )
        print(f"samples: skipped ({why})")
        return
    ck = read_input(Path(cfg.checkpoint.dir), log=lambda msg: None)
    net = build_net(ck.config, ck.state, device=trainer.device)
    tok = trainer.tokenizer
    length = s.length or cfg.model.seq_len
    opts = SampleOptions(length=max(length - 1, 1), steps=s.steps, nucleus_p=s.nucleus_p, seed=s.seed)
    stats = generate(net, s.num_samples, opts, prompt=[tok.eos_token_id])  # start at a document boundary
    print(
        f"\n=== {s.num_samples} samples of step {ck.source['step']} ({length} tokens, block size "
        f"{cfg.model.block_size}, {s.steps} steps/block, KV cache, {stats.seconds:.1f}s) ===",
        flush=True,
    )
    for r in stats.results:
        print(
            f"--- sample {r.index} ---  NFE {r.nfe}, entropy {r.entropy:.2f}\n{tok.decode(r.generated)}\n", flush=True
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bd3_megatron.cli import quiet_library_warnings

    quiet_library_warnings()
    from bd3_megatron.checkpoint.sharded import CheckpointError
    from bd3_megatron.config import ConfigError, load_config
    from bd3_megatron.training.run_lock import RunLockError

    try:
        overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
        cfg = load_config(args.config, overrides)
        from bd3_megatron.parallel import state
        from bd3_megatron.training.run_lock import lock_run
        from bd3_megatron.training.trainer import PreemptionRequested, StopSignal, Trainer, TrainingStopped

        stop = StopSignal()  # from here on a stop request is remembered and honoured at the first step boundary
        ctx = state.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed, cfg.parallel.device)
        lock = None
        try:
            # one run per checkpoint folder, before any work (rank 0 holds it; see run_lock for why one rank)
            lock = lock_run(cfg.checkpoint.dir, ctx.rank, cfg.checkpoint.lock, log=lambda text: print(text, flush=True))
            trainer = Trainer(cfg, ctx)
            info = trainer.data_info
            params_m = sum(p.numel() for p in trainer.model.parameters()) / 1e6
            trainer.logger.info(
                f"bd3-megatron: {cfg.model.num_layers}x{cfg.model.hidden_size} (heads {cfg.model.num_heads}), "
                f"L={cfg.model.seq_len} L'={cfg.model.block_size}, {params_m:.1f}M "
                f"params/rank, device {ctx.runtime.device}, tp={ctx.tp} pp={ctx.pp} dp={ctx.dp}; data "
                f"{info['train_rows']} train / {info['val_rows']} val rows of {cfg.data.path} ({cfg.data.tokenizer})"
            )
            trainer.maybe_resume()
            if trainer.step == 0:
                trainer.initial_eval()
            trainer.train(stop)
            if not args.no_sample and cfg.sample.after_train:
                print_samples(trainer, cfg)
            trainer.logger.close()
        finally:
            if lock is not None:
                lock.release()
            state.shutdown()
    except (ConfigError, CheckpointError, RunLockError, FileNotFoundError, ValueError) as exc:
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
