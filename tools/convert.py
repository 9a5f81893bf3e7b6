"""``python tools/convert.py --input CKPT_DIR [--step N] [--ema|--raw] --output DIR [--format native|hf]``

Turns a training checkpoint of any TP/PP/ZeRO layout into the single-device sampler checkpoint
(``model.safetensors`` + ``config.json``, loadable with torch + safetensors alone), or moves weights between the
native and the reference (bd3lms Hugging Face ``BD3LM``) layouts in either direction. ``--input`` may be

* a training checkpoint root (holding ``latest``) or one of its ``step_XXXXXXXX`` directories,
* a sampler folder written by this tool (native), or an HF bd3lm folder (import),
* a bd3lms Lightning training checkpoint (``*.ckpt``; EMA weights unless --raw), read without executing pickled code.

Tensor-parallel shards are concatenated along their partition dimension in rank order; pipeline stages each
contribute their own (globally numbered) layers; ZeRO does not touch the model files. Vocabulary padding rows are
dropped. EMA weights are exported by default. Bad input ends with one ``error:`` line and exit code 2; an existing
output folder is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bd3_megatron.checkpoint import sharded as ckpt
from bd3_megatron.checkpoint.from_training import gather_training_checkpoint, read_input, resolve_step_dir  # noqa: F401
from bd3_megatron.checkpoint.hf import to_hf
from bd3_megatron.checkpoint.sampler import save_checkpoint, summary_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python tools/convert.py",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input",
        required=True,
        type=Path,
        help="training checkpoint (root or step dir), a native/HF sampler folder, or a bd3lms Lightning .ckpt",
    )
    p.add_argument("--step", type=int, default=None, help="step to export (default: the one 'latest' names)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ema", dest="weights", action="store_const", const="ema", help="export EMA weights (default)")
    g.add_argument("--raw", dest="weights", action="store_const", const="raw", help="export the raw weights")
    p.add_argument("--output", required=True, type=Path, help="new folder for config.json + model.safetensors")
    p.add_argument(
        "--format",
        choices=("native", "hf"),
        default="native",
        help="native (this project) or hf (the reference bd3lms BD3LM layout)",
    )
    p.add_argument("--quiet", action="store_true", help="no summary table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ck = read_input(args.input, args.step, args.weights)
        out = save_checkpoint(ck, args.output, args.format)
    except (ValueError, FileNotFoundError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    c = ck.config
    print(
        f"model: {c.num_layers} layers x {c.hidden_size} (heads {c.num_heads}, ffn {c.ffn_hidden_size}), "
        f"L={c.seq_len} L'={c.block_size}, vocab {c.vocab_size} (mask id {c.mask_token_id}), tokenizer "
        f"{ck.tokenizer}, clip window [{ck.clip_window[0]:g}, {ck.clip_window[1]:g}]"
    )
    print(f"source: {json.dumps(ck.source, sort_keys=True)}")
    for note in ck.notes:
        print(f"note: {note}")
    if not args.quiet:
        print(summary_table(ck.state if args.format == "native" else to_hf(ck)[1]))
    print(f"wrote {args.format} checkpoint {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
