"""Sampler throughput: tokens/s and NFE at batch 1 and 64, block sizes 4/8/16, KV cache on/off, threshold on/off.

    python bench/sampler.py --checkpoint runs/tiny_cpu/sampler       # a converted checkpoint
    python bench/sampler.py                                          # random weights of the demo model's shape

Every configuration generates fixed-length samples (no early stopping) from the same seed; the ``same`` column
counts the samples whose cached run produced exactly the tokens of the uncached one (they can differ only where a
draw falls within fp32 round-off of a CDF boundary). tokens/s counts generated tokens over
wall time (batch included); NFE is the mean number of forward passes a sample needed; calls counts batched network
calls. Not a test: it prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bd3_megatron.checkpoint.sampler import load_checkpoint  # noqa: E402
from bd3_megatron.parallel.device import device_name, local_device, synchronize  # noqa: E402
from bd3_megatron.sampling.kv_sampler import SampleOptions, generate  # noqa: E402
from bd3_megatron.sampling.net import NetConfig, build_net  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="converted sampler folder (default: random weights)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--length", type=int, default=64, help="generated tokens per sample")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--block-sizes", default="4,8,16")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--nucleus-p", type=float, default=0.9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration; the fastest is reported")
    return p.parse_args(argv)


def net_device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def load_net(args) -> tuple[torch.nn.Module, str]:
    args.device = str(local_device(args.device))
    if args.checkpoint:
        ck = load_checkpoint(args.checkpoint)
        net = build_net(ck.config, ck.state, device=args.device)
        desc = f"{args.checkpoint} (step {ck.source.get('step')}, {ck.source.get('weights')})"
    else:
        cfg = NetConfig(
            num_layers=args.layers,
            hidden_size=args.hidden,
            num_heads=args.heads,
            ffn_hidden_size=4 * args.hidden,
            vocab_size=args.vocab,
            mask_token_id=args.vocab - 1,
            seq_len=args.seq_len,
            block_size=4,
        )
        net = build_net(cfg, device=args.device)
        desc = "random weights"
    if args.dtype == "bf16":
        net = net.to(torch.bfloat16)
    c = net.cfg
    return net, (
        f"{desc}: {c.num_layers}x{c.hidden_size}, {c.num_heads} heads, vocab {c.vocab_size}, "
        f"L={c.seq_len}, trained L'={c.block_size}"
    )


def run_one(net, batch: int, block: int, cache: bool, threshold: float | None, args) -> tuple[dict, list]:
    opts = SampleOptions(
        length=args.length,
        block_size=block,
        kv_cache=cache,
        nucleus_p=args.nucleus_p,
        seed=0,
        schedule="threshold" if threshold else "ddpm",
        threshold=threshold or 0.9,
        context_len=(net.cfg.seq_len // block) * block,
    )
    took = float("inf")
    for _ in range(max(1, args.repeat)):  # a shared machine: the fastest run is the least disturbed one
        synchronize(net_device(net))
        t0 = time.perf_counter()
        stats = generate(net, batch, opts)
        synchronize(net_device(net))
        took = min(took, time.perf_counter() - t0)
    nfe = sum(r.nfe for r in stats.results) / batch
    return {"tok_s": stats.tokens / took, "nfe": nfe, "calls": stats.model_calls, "s": took}, [
        r.tokens for r in stats.results
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    net, desc = load_net(args)
    device = device_name(net_device(net))
    print(f"# sampler bench: {desc}")
    print(
        f"device {args.device} ({device}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{args.dtype}, {args.length} generated tokens per sample, DDPM steps = L', nucleus {args.nucleus_p}, "
        f"threshold {args.threshold}, fastest of {args.repeat} run(s)"
    )
    run_one(net, 1, 4, True, None, argparse.Namespace(**{**vars(args), "length": 8}))  # warm-up
    print("\n| batch | L' | decoding | cache | tokens/s | NFE/sample | calls | seconds | same |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in map(int, args.batch_sizes.split(",")):
        for block in map(int, args.block_sizes.split(",")):
            for threshold in (None, args.threshold):
                rows = {}
                for cache in (False, True):
                    rows[cache] = run_one(net, batch, block, cache, threshold, args)
                same = f"{sum(a == b for a, b in zip(rows[True][1], rows[False][1]))}/{batch}"
                for cache in (False, True):
                    r = rows[cache][0]
                    print(
                        f"| {batch} | {block} | {'threshold' if threshold else 'ddpm'} | {'on' if cache else 'off'} "
                        f"| {r['tok_s']:.1f} | {r['nfe']:.1f} | {r['calls']} | {r['s']:.2f} | {same} |",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
