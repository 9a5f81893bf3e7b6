"""``python tools/eval_ppl.py --checkpoint DIR [--data PATH] [--block-size N] [--samples-per-seq K]``

NELBO perplexity (an upper bound on the true perplexity) of a training checkpoint, as the reference computes it:
validation rows, one t per (sequence, block) from the unclipped window, token-weighted over the split, EMA weights.
``--samples-per-seq K`` averages K independent noise draws per sequence (still a bound, lower variance).
``--block-size`` may differ from training: the weights do not depend on it, only the attention mask does.
``--window BETA OMEGA`` evaluates under another clip window: with L'=1 and ``--window 1 1`` every token is masked and
sees exactly its clean prefix, so the figure is the exact autoregressive NLL (the reference's L'=1 evaluation).
Optionally the generative perplexity of samples (drawn with the KV-cache sampler) under a scorer
(``--gen-ppl-model PATH``): this project's own AR baseline or L'=1 BD3 checkpoint (training checkpoint or
tools/convert.py folder), or any local Hugging Face causal-LM folder; nothing is downloaded. Runs in one process
(any saved TP/PP layout is merged on load).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint.dir (uses latest) or a step_N directory")
    p.add_argument("--data", default=None, help="evaluation data (default: the run's data.path); its validation split")
    p.add_argument("--block-size", type=int, default=None, help="block size L' to evaluate with (default: training)")
    p.add_argument("--samples-per-seq", type=int, default=1, help="noise draws averaged per sequence (K)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward (default: training micro batch)")
    p.add_argument(
        "--max-rows",
        type=int,
        default=0,
        help="evaluate exactly the first N validation rows (0 = all; fewer if the split is shorter)",
    )
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument(
        "--window",
        type=float,
        nargs=2,
        metavar=("BETA", "OMEGA"),
        default=None,
        help="clip window for the NELBO (default: unclipped, 1e-3 1)",
    )
    p.add_argument(
        "--gen-ppl-model",
        default=None,
        help="scorer for generated samples: this project's ar or L'=1 bd3 checkpoint, or a local HF causal-LM folder",
    )
    p.add_argument("--num-samples", type=int, default=4, help="samples for generative perplexity")
    p.add_argument("--sample-steps", type=int, default=None, help="DDPM steps per block (default: the block size)")
    p.add_argument("--nucleus-p", type=float, default=0.9, help="top-p for those samples (the reference's 0.9)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--output", default=None, help="also write the results as JSON to this file")
    return p.parse_args(argv)


def build_evaluator(args):
    """A single-process :class:`Evaluator` (model and data, no optimizer) over the checkpoint's config with the
    requested evaluation settings and the checkpoint's EMA (or ``--raw``) weights merged from any saved layout.
    Returns (evaluator, checkpoint path, its metadata)."""
    from bd3_megatron.checkpoint import sharded as ckpt
    from bd3_megatron.config import config_from_dict
    from bd3_megatron.model.bd3_model import canonical_parameter_names
    from bd3_megatron.model.build import build_model
    from bd3_megatron.parallel import state
    from bd3_megatron.training.batches import BatchMaker
    from bd3_megatron.training.checkpointer import load_canonical
    from bd3_megatron.training.evaluator import Evaluator
    from data_pipeline.shards import IncompatibleData
    from data_pipeline.tokenizers import get_tokenizer
    from data_pipeline.training_data import open_training_data

    path = ckpt.resolve_checkpoint(args.checkpoint, None)
    meta = ckpt.read_metadata(path)
    raw = meta["config"]
    raw["parallel"] = {"tp": 1, "pp": 1, "zero_stage": 0, "device": raw["parallel"]["device"]}
    raw["diffusion"] = dict(raw["diffusion"], clip_search=False)
    batch = args.batch_size or raw["train"]["micro_batch_size"]
    # every row is scored with noise keyed by the row, so the figure does not depend on the batch size
    raw["train"] = dict(raw["train"], micro_batch_size=batch, global_batch_size=batch, eval_rows=args.max_rows)
    for section, key in (("train", "eval_batches"), ("diffusion", "clip_search_batches")):
        raw[section].pop(key, None)  # written by checkpoints saved before eval_rows / clip_search_rows
    if args.data:
        raw["data"] = dict(raw["data"], path=args.data)
    if args.block_size:
        seq_len = raw["model"]["seq_len"]
        if args.block_size < 1 or seq_len % args.block_size:  # else the config check would name model.* keys
            raise ValueError(
                f"--block-size {args.block_size} must divide the checkpoint's seq_len {seq_len}; "
                f"pick a divisor of {seq_len}"
            )
        raw["model"] = dict(raw["model"], block_size=args.block_size)
        if raw["sample"].get("length") and raw["sample"]["length"] % args.block_size:
            raw["sample"]["length"] = None
    cfg = config_from_dict(raw)
    ctx = state.initialize(1, 1, cfg.train.seed, cfg.parallel.device, env=state.LaunchEnv(0, 1, 0, "single"))
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    try:  # the run's own data path (raw text, a prepared folder, or one streamed from object storage)
        _, val_rows, _, _ = open_training_data(cfg.data, tokenizer, cfg.model.seq_len, seed=cfg.train.seed)
    except IncompatibleData as exc:  # its message names training config keys; eval_ppl's only choice is --data
        raise ValueError(incompatible_data_message(exc, cfg)) from None
    model = build_model(cfg, ctx, tokenizer.vocab_size, tokenizer.mask_token_id)
    named, canonical = dict(model.named_parameters()), canonical_parameter_names(model)
    weights, ema = ckpt.load_resharded(path, meta, named, canonical)
    load_canonical(named, canonical, weights if args.raw or ema is None else ema["shadow"], source=path)
    batches = BatchMaker(cfg, tokenizer.mask_token_id, ctx.runtime.device)
    dtype = ctx.runtime.compute_dtype(cfg.train.precision)
    return Evaluator(cfg, ctx, model, batches, val_rows, dtype), path, meta


def incompatible_data_message(exc, cfg) -> str:
    """The fix for evaluation data that does not match the checkpoint, in eval_ppl's terms: the checkpoint fixes the
    tokenizer and seq_len, so the data has to be prepared for them (or --data left out)."""
    prepare = (
        f"python -m data_pipeline.prepare --input TEXT --output DIR --tokenizer {cfg.data.tokenizer} "
        f"--seq-len {cfg.model.seq_len}"
    )
    fix = f"pass --data a folder prepared for it ({prepare}), or leave --data out to use the run's validation data"
    if exc.field == "tokenizer":
        return (
            f"evaluation data {exc.where} was prepared with tokenizer {exc.got!r} but the checkpoint was trained "
            f"with {exc.want!r}; {fix}"
        )
    if exc.field == "seq_len":
        return (
            f"evaluation data {exc.where} has rows of {exc.got} tokens but the checkpoint was trained with "
            f"seq_len {exc.want}; {fix}"
        )
    return str(exc)


def nelbo_k_samples(evaluator, k: int, window=None) -> list[float]:
    """Validation NELBO per token for k independent noise draws (draw 0 is the training run's evaluation noise)."""
    return [evaluator.evaluate(0, noise_draw=draw, window=window)["val_nelbo"] for draw in range(k)]


def generated_texts(path, args, device) -> tuple[list[str], list[float]]:
    """``--num-samples`` samples of the evaluated weights from the KV-cache sampler (fixed length, starting at a
    document boundary, nucleus ``--nucleus-p``), decoded to text, with their token entropies."""
    from bd3_megatron.checkpoint.from_training import read_input
    from bd3_megatron.modes import get_mode
    from bd3_megatron.sampling.kv_sampler import SampleOptions, generate, token_entropy
    from bd3_megatron.sampling.net import build_net
    from data_pipeline.tokenizers import get_tokenizer

    ck = read_input(path, weights="raw" if args.raw else None, log=lambda msg: None)
    if not get_mode(ck.config.mode).samples:
        raise ValueError(
            f"generative perplexity samples a bd3 or sedd model; this checkpoint is model.mode={ck.config.mode}"
        )
    tok = get_tokenizer(ck.tokenizer)
    net = build_net(ck.config, ck.state, device=device)
    block = args.block_size or ck.config.block_size
    opts = SampleOptions(
        length=ck.config.seq_len - 1,
        block_size=block,
        steps=args.sample_steps,
        nucleus_p=args.nucleus_p,
        seed=args.seed,
    )
    results = generate(net, args.num_samples, opts, prompt=[tok.eos_token_id]).results
    return [tok.decode(r.generated) for r in results], [token_entropy(r.generated) for r in results]


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bd3_megatron.cli import quiet_library_warnings

    quiet_library_warnings()
    from bd3_megatron.checkpoint.sharded import CheckpointError
    from bd3_megatron.config import ConfigError
    from bd3_megatron.modes import get_mode
    from bd3_megatron.parallel import state

    for flag, value, least in (
        ("--samples-per-seq", args.samples_per_seq, 1),
        ("--max-rows", args.max_rows, 0),
        ("--batch-size", args.batch_size or 1, 1),
    ):
        if value < least:
            print(f"error: {flag} must be >= {least}, got {value}", file=sys.stderr)
            return 2
    try:
        window = None
        if args.window:
            from bd3_megatron.diffusion.schedule import ClipWindow

            if not 0.0 < args.window[0] <= args.window[1] <= 1.0:
                raise ValueError(f"--window needs 0 < BETA <= OMEGA <= 1, got {args.window[0]:g} {args.window[1]:g}")
            window = ClipWindow(*args.window)
        evaluator, path, meta = build_evaluator(args)
        try:
            if window is not None and not get_mode(evaluator.cfg.model.mode).diffusion:
                raise ValueError("--window applies to diffusion models; an ar checkpoint's figure is its exact NLL")
            draws = nelbo_k_samples(evaluator, args.samples_per_seq, window)
            nelbo = sum(draws) / len(draws)
            result = {
                "checkpoint": str(path),
                "step": meta["step"],
                "block_size": evaluator.cfg.model.block_size,
                "val_rows": evaluator.rows_scored(),
                "nelbo": nelbo,
                "ppl": math.exp(min(nelbo, 50.0)),
                "bpd": nelbo / math.log(2),
                "samples_per_seq": args.samples_per_seq,
                "nelbo_draws": draws,
                "weights": "raw" if args.raw else "ema",
                "window": [window.eps_min, window.eps_max] if window else [1e-3, 1.0],
            }
            if args.gen_ppl_model:
                from bd3_megatron.sampling.scorer import generative_perplexity, load_scorer

                device = evaluator.ctx.runtime.device
                scorer = load_scorer(args.gen_ppl_model, device=device)
                texts, entropies = generated_texts(path, args, device)
                gen = generative_perplexity(scorer, texts)
                result.update(
                    gen_ppl=gen.mean,
                    gen_ppl_token_weighted=gen.token_weighted,
                    gen_ppl_per_sample=gen.per_sample,
                    gen_ppl_tokens=gen.tokens,
                    scorer=scorer.name,
                    entropy=sum(entropies) / len(entropies),
                    samples=texts,
                )
        finally:
            state.shutdown()
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    exact = window is not None and result["block_size"] == 1 and window.eps_min == window.eps_max == 1.0
    print(
        f"step {result['step']}  L'={result['block_size']}  rows {result['val_rows']}  K={args.samples_per_seq}  "
        f"window [{result['window'][0]:g}, {result['window'][1]:g}]  NELBO {result['nelbo']:.4f} nats/token  "
        f"PPL {'=' if exact else '<='} {result['ppl']:.2f}"
    )
    if "gen_ppl" in result:
        print(
            f"generative PPL {result['gen_ppl']:.2f} (mean of {args.num_samples} samples; token-weighted "
            f"{result['gen_ppl_token_weighted']:.2f}) under {result['scorer']}  entropy {result['entropy']:.3f}"
        )
    print(json.dumps(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
