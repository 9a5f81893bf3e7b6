"""``python tools/sample.py --checkpoint DIR --num-samples N --length T [--block-size L'] [--steps S]
[--nucleus-p P] [--kv-cache/--no-kv-cache] [--threshold C] [--seed S] [--prompt TEXT] [--output FILE.jsonl]``

Samples from a sampler checkpoint written by tools/convert.py (native or HF bd3lm layout) with torch alone: no
megatron-core, no DeepSpeed. Prints each text with its length, NFE (forward passes it needed), token entropy and
tokens/s. Samples start at a document boundary (the tokenizer's EOS, which the packer puts between documents)
unless ``--no-bos``; by default they stop at their first EOS or when the entropy of their last 256 tokens
collapses (``--fixed-length`` always generates T tokens). Sample i always uses the random stream (seed, i), so the
batch size changes speed, not samples. Bad input ends with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/sample.py", description="Sample from a converted BD3-LM.")
    p.add_argument("--checkpoint", required=True, type=Path, help="folder written by tools/convert.py")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument(
        "--length",
        type=int,
        default=None,
        help="tokens to generate (cap with variable length); default: the model's context length (sedd: what the "
        "prompt leaves of it)",
    )
    p.add_argument("--block-size", type=int, default=None, help="L' (default: the trained block size)")
    p.add_argument(
        "--steps", type=int, default=None, help="DDPM steps per block (default: L'); sedd: analytic steps (default: L)"
    )
    p.add_argument("--nucleus-p", type=float, default=0.9, help="top-p (1.0 = plain sampling)")
    p.add_argument("--greedy", action="store_true", help="propose the most probable token")
    p.add_argument("--first-hitting", action="store_true", help="reveal one token per forward pass")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="confidence-threshold parallel decoding: reveal every token with probability > C",
    )
    p.add_argument(
        "--kv-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="exact KV cache of the clean blocks (default on)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", type=str, default=None, help="text the samples continue")
    p.add_argument("--no-bos", action="store_true", help="do not start at a document boundary token")
    p.add_argument("--fixed-length", action="store_true", help="no EOS/entropy stopping")
    p.add_argument(
        "--entropy-min",
        type=float,
        default=None,
        help="stop a sample where the entropy of its last 256 tokens falls below this (nats); default: the "
        "tokenizer's (4.0 for subwords as the reference, 2.5 for bytes)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="samples generated together")
    p.add_argument("--output", type=Path, default=None, help="write one JSON object per sample")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="print stats only, not the texts")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


class Progress:
    """A one-line progress bar on stderr (only on a terminal)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.t0 = total, enabled and sys.stderr.isatty(), 0, time.time()

    def batch(self, base: int, per_batch: int):
        def update(done: int, total: int) -> None:
            if not self.enabled:
                return
            n = base + round(done / max(total, 1) * per_batch)
            frac = n / max(self.total, 1)
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r[{bar:<30}] {n}/{self.total} samples  {time.time() - self.t0:6.1f}s")
            sys.stderr.flush()

        return update

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from bd3_megatron.checkpoint.sampler import load_checkpoint
    from bd3_megatron.modes import get_mode
    from bd3_megatron.parallel.device import local_device
    from bd3_megatron.sampling.kv_sampler import SampleOptions, generate
    from bd3_megatron.sampling.net import build_net
    from data_pipeline.tokenizers import entropy_floor

    try:
        if args.num_samples < 1 or args.batch_size < 1:
            raise ValueError("--num-samples and --batch-size must be >= 1")
        if args.threads:
            torch.set_num_threads(args.threads)
        device = local_device(args.device)
        ck = load_checkpoint(args.checkpoint)
        net = build_net(ck.config, ck.state, device=device)
        if args.dtype == "bf16":
            net = net.to(torch.bfloat16)
        tok = None
        if ck.tokenizer:
            from data_pipeline.tokenizers import get_tokenizer

            tok = get_tokenizer(ck.tokenizer)
        elif args.prompt:
            raise ValueError("this checkpoint names no tokenizer, so --prompt text cannot be encoded")
        prompt: list[int] = [] if args.no_bos or tok is None else [tok.eos_token_id]
        if args.prompt:
            prompt += tok.encode(args.prompt)
        schedule = "threshold" if args.threshold is not None else "first_hitting" if args.first_hitting else "ddpm"
        if args.threshold is not None and args.first_hitting:
            raise ValueError("choose either --threshold or --first-hitting")
        # 0 is a value to refuse, not "the default": only an absent option falls back to the checkpoint's
        block = ck.config.block_size if args.block_size is None else args.block_size
        whole_context = get_mode(ck.config.mode).score_entropy  # SEDD denoises its L-token context at once
        default_length = ck.config.seq_len - len(prompt) if whole_context else ck.config.seq_len
        length = default_length if args.length is None else args.length
        for flag, value in (("--block-size", block), ("--length", length)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if block > ck.config.seq_len:
            raise ValueError(
                f"--block-size {block} is larger than the model's context of {ck.config.seq_len} "
                f"tokens (its model.seq_len); pick a block size <= {ck.config.seq_len}"
            )
        if block != ck.config.block_size:
            print(
                f"note: sampling with L'={block}; the model was trained with L'={ck.config.block_size}", file=sys.stderr
            )
        opts = SampleOptions(
            length=length,
            block_size=block,
            schedule=schedule,
            steps=args.steps,
            threshold=args.threshold if args.threshold is not None else 0.9,
            nucleus_p=args.nucleus_p,
            greedy=args.greedy,
            kv_cache=args.kv_cache,
            seed=args.seed,
            var_length=not args.fixed_length,
            eos_id=tok.eos_token_id if tok else None,
            entropy_min=entropy_floor(ck.tokenizer) if args.entropy_min is None else args.entropy_min,
        )
        opts.validate()
        out_fh = None
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            out_fh = open(args.output, "w")
        progress = Progress(args.num_samples, not args.no_progress)
        t0 = time.time()
        results, calls = [], 0
        for start in range(0, args.num_samples, args.batch_size):
            n = min(args.batch_size, args.num_samples - start)
            stats = generate(net, n, opts, prompt=prompt or None, first_index=start, progress=progress.batch(start, n))
            calls += stats.model_calls
            results.extend(stats.results)
        progress.close()
        took = time.time() - t0
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    for r in results:
        text = tok.decode(r.generated) if tok else " ".join(map(str, r.generated))
        print(
            f"--- sample {r.index}: {len(r.generated)} tokens, NFE {r.nfe}, entropy {r.entropy:.2f} nats, "
            f"{r.tokens_per_s:.1f} tok/s, stop: {r.stop} ---"
        )
        if not args.quiet:
            print(text + "\n")
        if out_fh:
            out_fh.write(
                json.dumps(
                    {
                        "index": r.index,
                        "text": text,
                        "tokens": r.generated,
                        "prompt": r.tokens[: r.prompt_len],
                        "length": len(r.generated),
                        "nfe": r.nfe,
                        "entropy": r.entropy,
                        "stop": r.stop,
                        "seconds": r.seconds,
                    }
                )
                + "\n"
            )
    if out_fh:
        out_fh.close()
    total = sum(len(r.generated) for r in results)
    print(
        f"=== {len(results)} samples, {total} tokens in {took:.2f}s ({total / max(took, 1e-9):.1f} tok/s), "
        f"{calls} network calls, mean NFE {sum(r.nfe for r in results) / len(results):.1f}, "
        + (
            "SEDD analytic sampler over the whole context"
            if whole_context
            else f"L'={block}, schedule {schedule}, kv-cache {'on' if args.kv_cache else 'off'}"
        )
        + f", device {device} ==="
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
