"""``python tools/eval_ppl.py --checkpoint DIR [--data PATH] [--block-size N] [--samples-per-seq K]``

NELBO perplexity (an upper bound on the true perplexity) of a training checkpoint, as the reference computes it:
validation rows, one t per (sequence, block) from the unclipped window, token-weighted over the split, EMA weights.
``--samples-per-seq K`` averages K independent noise draws per sequence (still a bound, lower variance).
``--block-size`` may differ from training: the weights do not depend on it, only the attention mask does.
Optionally generative perplexity of samples under a local causal LM (``--gen-ppl-model PATH``, any Hugging Face
causal-LM folder; nothing is downloaded) and their token entropy. Runs in one process (any saved TP/PP layout is
merged on load).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint.dir (uses latest) or a step_N directory")
    p.add_argument("--data", default=None, help="evaluation data (default: the run's data.path); its validation split")
    p.add_argument("--block-size", type=int, default=None, help="block size L' to evaluate with (default: training)")
    p.add_argument("--samples-per-seq", type=int, default=1, help="noise draws averaged per sequence (K)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward (default: training micro batch)")
    p.add_argument("--max-rows", type=int, default=0, help="evaluate only the first N validation rows (0 = all)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--gen-ppl-model", default=None, help="local causal LM folder scoring generated samples")
    p.add_argument("--num-samples", type=int, default=4, help="samples for generative perplexity")
    p.add_argument("--sample-steps", type=int, default=16, help="denoising steps per block for those samples")
    p.add_argument("--output", default=None, help="also write the results as JSON to this file")
    return p.parse_args(argv)


def build_evaluator(args):
    """A single-process Trainer over the checkpoint's config with the requested evaluation settings."""
    from bd3_megatron.config import config_from_dict
    from bd3_megatron.parallel import state
    from bd3_megatron.training import checkpoint as ckpt
    from bd3_megatron.training.trainer import Trainer

    path = ckpt.resolve_checkpoint(args.checkpoint, None)
    meta = ckpt.read_metadata(path)
    raw = meta["config"]
    raw["parallel"] = {"tp": 1, "pp": 1, "zero_stage": 0, "device": raw["parallel"]["device"]}
    raw["checkpoint"] = {"dir": None}
    raw["log"] = dict(raw["log"], wandb=False, progress=False)
    raw["optim"] = dict(raw["optim"], ema=0.0)
    raw["diffusion"] = dict(raw["diffusion"], clip_search=False)
    batch = args.batch_size or raw["train"]["micro_batch_size"]
    raw["train"] = dict(raw["train"], micro_batch_size=batch, global_batch_size=batch,
                        eval_batches=math.ceil(args.max_rows / batch) if args.max_rows else 0)
    if args.data:
        raw["data"] = dict(raw["data"], path=args.data)
    if args.block_size:
        raw["model"] = dict(raw["model"], block_size=args.block_size)
        if raw["sample"].get("length") and raw["sample"]["length"] % args.block_size:
            raw["sample"]["length"] = None
    cfg = config_from_dict(raw)
    ctx = state.initialize(1, 1, cfg.train.seed, cfg.parallel.device, env=state.LaunchEnv(0, 1, 0, "single"))
    trainer = Trainer(cfg, ctx)
    weights, ema = ckpt.load_resharded(path, meta, trainer.named, trainer.canonical)
    trainer.load_weights(weights if args.raw or ema is None else ema["shadow"], source=path)
    return trainer, path, meta


def nelbo_k_samples(trainer, k: int) -> list[float]:
    """Validation NELBO per token for k independent noise draws (draw 0 is the training run's evaluation noise)."""
    return [trainer.evaluate(noise_draw=draw)["val_nelbo"] for draw in range(k)]


def token_entropy(ids: list[int]) -> float:
    """Shannon entropy (nats) of a sample's token histogram, as the reference reports it."""
    counts = torch.bincount(torch.tensor(ids)).double()
    p = counts[counts > 0] / len(ids)
    return float(-(p * p.log()).sum())


def generative_ppl(texts: list[str], model_dir: str) -> list[float]:
    """Per-sample perplexity of ``texts`` under a local causal LM (no network: local_files_only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(model_dir, "config.json").exists():
        raise FileNotFoundError(f"--gen-ppl-model {model_dir} is not a Hugging Face model folder (no config.json)")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    ctx = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", 1024)
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt").input_ids[:, :ctx]
            if ids.shape[1] < 2:
                out.append(float("nan"))
                continue
            loss = lm(ids, labels=ids).loss
            out.append(math.exp(float(loss)))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bd3_megatron.cli import quiet_library_warnings

    quiet_library_warnings()
    from bd3_megatron.config import ConfigError
    from bd3_megatron.parallel import state
    from bd3_megatron.training.checkpoint import CheckpointError

    if args.samples_per_seq < 1:
        print("error: --samples-per-seq must be >= 1", file=sys.stderr)
        return 2
    try:
        trainer, path, meta = build_evaluator(args)
        try:
            draws = nelbo_k_samples(trainer, args.samples_per_seq)
            nelbo = sum(draws) / len(draws)
            result = {"checkpoint": str(path), "step": meta["step"], "block_size": trainer.cfg.model.block_size,
                      "val_rows": trainer._val_batch_count() * trainer.cfg.train.micro_batch_size,
                      "nelbo": nelbo, "ppl": math.exp(min(nelbo, 50.0)), "bpd": nelbo / math.log(2),
                      "samples_per_seq": args.samples_per_seq, "nelbo_draws": draws,
                      "weights": "raw" if args.raw else "ema"}
            if args.gen_ppl_model:
                from bd3_megatron.sampling.block_sampler import sample

                m = trainer.model.eval()
                tokens = sample(lambda xt, x0, a, b: m.block_logits(xt, x0, a, b), num_samples=args.num_samples,
                                length=trainer.cfg.model.seq_len, block_size=trainer.cfg.model.block_size,
                                context_len=trainer.cfg.model.seq_len, mask_id=trainer.tokenizer.mask_token_id,
                                steps=args.sample_steps, seed=0, device=trainer.device)
                texts = [trainer.tokenizer.decode(r) for r in tokens.tolist()]
                ppls = generative_ppl(texts, args.gen_ppl_model)
                result.update(gen_ppl=sum(ppls) / len(ppls), gen_ppl_per_sample=ppls,
                              entropy=sum(token_entropy(r) for r in tokens.tolist()) / len(texts))
        finally:
            state.shutdown()
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"step {result['step']}  L'={result['block_size']}  rows {result['val_rows']}  K={args.samples_per_seq}  "
          f"NELBO {result['nelbo']:.4f} nats/token  PPL <= {result['ppl']:.2f}")
    if "gen_ppl" in result:
        print(f"generative PPL {result['gen_ppl']:.2f} ({args.num_samples} samples)  entropy {result['entropy']:.3f}")
    print(json.dumps(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
