"""Scale on paper: predicted step time, tokens/s and weak-scaling efficiency of the OWT recipe on 8, 32 and 128 GPUs.

    python bench/scaling_model.py                      # the table for slurm/owt_l4_128gpu.sh at 8/32/128 GPUs
    python bench/scaling_model.py --step-ms 120 --measured-batch 16 --ib-gbps 25
    python bench/scaling_model.py --check-gloo         # also: bytes each collective moves in the real gloo run

Inputs (all printed with the table):
  * the measured single-device step: ``--step-ms`` at ``--measured-batch`` sequences (default: the starting line of
    DESIGN.md §8, 182 ms/step for 12x768, L=1024, L'=4, batch 16 on one H100-class GPU). Compute per sequence is taken
    as that time / batch at any micro-batch size, and splits perfectly over tensor- and pipeline-parallel ranks.
  * the model sizes from the config (``--config``, default configs/owt_small_l4.yaml, micro-batch 4 as the slurm
    script sets it; vocabulary from the tokenizer, padded as the model pads it).
  * links (``Links``): NVLink inside a node, InfiniBand across nodes, a fixed latency per collective call.

What each layout communicates per step (per rank; "payload" = the full buffer of the collective), as the stack does
it (DeepSpeed 0.19.8 with the config of bd3_megatron/training/engine.py, megatron-core 0.16.1), checked byte for
byte against the gloo run by ``--check-gloo`` and tests/test_scaling_model.py:
  * data parallel (DeepSpeed): ZeRO-0 all-reduces all gradients once per step. ZeRO-1 all-reduces them too (its
    ``use_multi_rank_bucket_allreduce`` default reduces with all-reduce, not reduce-scatter) in 5e7-element buckets, and
    after the step all-gathers the updated 16-bit parameters (flat buffer padded to a multiple of 2 x dp). ZeRO-2 does
    the same but reduces at every micro-batch's backward (micro-batches x the ZeRO-1 gradient traffic). For stages 1
    and 2 ``overlap_comm`` defaults to off, so the reduction does not overlap backward: the model adds it in full.
    Gradients travel in the parameter dtype (bf16 on GPU: the engine casts the module; fp32 on CPU).
  * tensor parallel (megatron-core): per micro-batch and layer 2 all-reduces forward (attention and MLP row-parallel
    outputs) and 2 backward (column-parallel input gradients) of [2L, b, h] (the last layer: [L, b, h] except the qkv
    input gradient, it computes the noisy half only); 1 forward for the vocab-parallel embedding; on the last stage
    the head's input gradient [N, h] and, per chunk of the fused cross-entropy, an fp32 [C] max and an fp32 [2, C]
    (sum-exp, target logit) all-reduce (N = masked noisy tokens of the micro-batch: L·b·E[t] on average).
  * pipeline parallel: per micro-batch one [2L, b, h] activation forward and one gradient backward per stage boundary
    (megatron's pipeline_dtype, fp32 as build_transformer_config sets it); 1F1B bubble (p-1)/(m+p-1).
  * scalars: loss, NELBO statistics, the gradient-variance probe gather, grad-norm/overflow reductions: a few calls of a
    few bytes; charged latency only.

Collective costs (ring algorithms): all-reduce 2(n-1)/n · S / bw, all-gather and reduce-scatter (n-1)/n · S / bw,
point-to-point S / bw, each plus one latency. Rank order is megatron's (tp fastest, then dp, then pp), so a group's
stride decides whether it stays inside a node. Not a test: it prints tables.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

DEFAULT_STEP_MS = 182.0  # DESIGN.md §8: megatron-core GPTModel + flex BD3 attention, 12x768, L=1024, batch 16, H100
DEFAULT_MEASURED_BATCH = 16
REDUCE_BUCKET = 5e7  # training.engine.deepspeed_config: reduce_bucket_size / allgather_bucket_size (elements)
ALLREDUCE_BUCKET_ZERO0 = 5e8  # DeepSpeed's allreduce_bucket_size default, used by ZeRO-0's buffered all-reduce
DP_GRAD_MIN_NUMEL = 1024  # data-parallel all-reduces at least this big are gradient buckets; smaller ones are scalars
PIPELINE_BYTES = 4  # megatron pipeline_dtype (fp32 in build_transformer_config)


# ---------------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ModelShape:
    """Transformer sizes that set the communication volume."""

    layers: int
    hidden: int
    ffn: int
    vocab: int  # real vocabulary incl. the mask token (padded per tp like the model does)
    seq_len: int  # L: the network sees 2L tokens
    mean_t: float  # E[t] = expected masked fraction of the noisy half (log-linear schedule, uniform t in the window)

    @classmethod
    def from_config(cls, cfg, vocab: int) -> ModelShape:
        m, d = cfg.model, cfg.diffusion
        return cls(
            layers=m.num_layers,
            hidden=m.hidden_size,
            ffn=m.ffn_hidden_size or 4 * m.hidden_size,
            vocab=vocab,
            seq_len=m.seq_len,
            mean_t=(d.eps_min + d.eps_max) / 2,
        )


@dataclass(frozen=True)
class Layout:
    """One training layout: tp x pp x dp GPUs, ZeRO stage, micro-batch b and m micro-batches per step per replica."""

    tp: int
    pp: int
    dp: int
    zero: int
    micro_batch: int
    micro_batches: int
    overlap_grad_reduce: bool = False  # DeepSpeed zero_optimization.overlap_comm (off for stages 1/2 by default)
    note: str = ""

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class Links:
    """Interconnect assumptions (H100/H200 HGX nodes). Bandwidths are per GPU per direction, in GB/s (1e9 bytes)."""

    gpus_per_node: int = 8
    nvlink_gbps: float = 450.0  # NVLink 4: 900 GB/s bidirectional per GPU
    ib_gbps: float = 50.0  # InfiniBand NDR 400 Gb/s, one NIC per GPU
    intra_latency_us: float = 10.0  # per collective call inside a node (NCCL small-message latency)
    inter_latency_us: float = 30.0  # per collective call across nodes
    # NCCL rings cross each node boundary once per channel and run one channel per local member's NIC, so a group
    # with k members per node gets k x ib_gbps (capped by NVLink). flat_ib: every hop at ib_gbps (pessimistic).
    flat_ib: bool = False


# ------------------------------------------------------------------------------------------- sizes per rank (exact)
def padded_vocab(shape: ModelShape, tp: int) -> int:
    from bd3_megatron.model.bd3_model import padded_vocab_size  # the model's own rounding (multiple of 128 x tp)

    return padded_vocab_size(shape.vocab, 128, tp)


def params_per_rank(shape: ModelShape, tp: int, pp: int, stage: int) -> int:
    """Parameters held by one rank of pipeline stage ``stage``: layers (linears split over tp, LayerNorm weight+bias
    replicated), the vocab-parallel embedding on the first stage, the final LayerNorm and the head on the last."""
    h = shape.hidden
    layer = (4 * h * h + 2 * h * shape.ffn) // tp + 4 * h
    n = shape.layers // pp * layer
    vocab_rows = padded_vocab(shape, tp) // tp
    if stage == 0:
        n += vocab_rows * h
    if stage == pp - 1:
        n += vocab_rows * h + 2 * h
    return n


def activation_numel(shape: ModelShape, micro_batch: int) -> int:
    """[2L, b, h]: one layer's input/output, the unit of TP all-reduces and pipeline messages."""
    return 2 * shape.seq_len * micro_batch * shape.hidden


def predicted_collectives(
    shape: ModelShape, layout: Layout, stage: int, act_bytes: int, masked: list[float] | None = None
) -> dict[str, tuple[int, float]]:
    """Collective calls and payload bytes per step of one rank of pipeline stage ``stage``: {kind: (calls, bytes)}.

    ``act_bytes``: bytes per activation/gradient/parameter element (2 for bf16 on GPU, 4 for fp32 on CPU).
    ``masked``: masked noisy tokens of each micro-batch (default: the expectation L·b·E[t]). Kinds: dp_grad_allreduce,
    dp_param_allgather, tp_allreduce, pp_send, pp_recv; groups of size 1 move nothing and are left out."""
    lay, m = layout, layout.micro_batches
    masked = masked if masked is not None else [shape.seq_len * lay.micro_batch * shape.mean_t] * m
    first, last = stage == 0, stage == lay.pp - 1
    out: dict[str, tuple[int, float]] = {}
    if lay.dp > 1:
        p = params_per_rank(shape, lay.tp, lay.pp, stage)
        reductions = m if lay.zero == 2 else 1  # ZeRO-2 reduces in every micro-batch's backward
        bucket = REDUCE_BUCKET if lay.zero else ALLREDUCE_BUCKET_ZERO0
        out["dp_grad_allreduce"] = (reductions * math.ceil(p / bucket), reductions * p * act_bytes)
        if lay.zero >= 1:
            align = 2 * lay.dp  # DeepSpeed's nccl_start_alignment_factor x dp
            flat = math.ceil(p / align) * align
            out["dp_param_allgather"] = (max(1, int(flat // REDUCE_BUCKET)), flat * act_bytes)
    if lay.tp > 1:
        act = activation_numel(shape, lay.micro_batch)
        per_mb = 4 * (shape.layers // lay.pp) + (1 if first else 0)
        calls, nbytes = per_mb * m, per_mb * m * act * act_bytes
        if last:
            # the noisy-half last layer: its two forward outputs and fc1's input gradient have L rows, not 2L
            nbytes -= m * 1.5 * act * act_bytes
            # the fused head: its input gradient [N, h], and per chunk of tokens the row max [C] and the stacked
            # (sum-exp, target logit) [2, C] in fp32
            from bd3_megatron.model.head import chunk_tokens_for

            chunk = chunk_tokens_for(padded_vocab(shape, lay.tp) // lay.tp)
            calls += sum(1 + 2 * math.ceil(n / chunk) for n in masked if n > 0)
            nbytes += sum(n * shape.hidden * act_bytes + 3 * n * 4 for n in masked)
        out["tp_allreduce"] = (calls, nbytes)
    if lay.pp > 1:
        msg = activation_numel(shape, lay.micro_batch) * PIPELINE_BYTES
        sends = (0 if last else m) + (0 if first else m)  # activations downstream, gradients upstream
        out["pp_send"] = (sends, sends * msg)
        out["pp_recv"] = (sends, sends * msg)
    calls, nbytes = scalar_collectives(shape, lay, stage)
    if calls:
        out["scalars"] = (calls, nbytes)
    return out


def scalar_collectives(shape: ModelShape, layout: Layout, stage: int) -> tuple[int, int]:
    """(calls, bytes) of the per-step scalar reductions of one rank. Last stage, over dp: the loss (fp32), the NELBO
    statistics (23 fp64) and the gather of the gradient-variance probe (m x h fp32 per rank); DeepSpeed's ZeRO
    overflow/norm scalar over dp (fp32); over the model-parallel group (tp x pp): the grad norm (ZeRO-0: the engine's
    fp64 global_grad_norm; ZeRO>=1: DeepSpeed's fp32 scalar)."""
    lay = layout
    calls = nbytes = 0
    if lay.dp > 1:
        if stage == lay.pp - 1:
            calls, nbytes = 3, 4 + 23 * 8 + lay.dp * lay.micro_batches * shape.hidden * 4
        if lay.zero >= 1:
            calls, nbytes = calls + 1, nbytes + 4
    if lay.tp * lay.pp > 1:
        calls, nbytes = calls + 1, nbytes + (8 if lay.zero == 0 else 4)
    return calls, nbytes


# ------------------------------------------------------------------------------------------------------ time model
def group_link(size: int, stride: int, links: Links) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) of a group of ``size`` ranks spaced ``stride`` apart in the global rank order."""
    per_node = max(1, links.gpus_per_node // stride) if stride < links.gpus_per_node else 1
    if size <= per_node:
        return links.nvlink_gbps * 1e9, links.intra_latency_us * 1e-6
    bw = links.ib_gbps if links.flat_ib else min(links.nvlink_gbps, per_node * links.ib_gbps)
    return bw * 1e9, links.inter_latency_us * 1e-6


def allreduce_time(nbytes: float, n: int, bw: float, latency: float, calls: int = 1) -> float:
    return 0.0 if n == 1 else 2 * (n - 1) / n * nbytes / bw + calls * latency


def allgather_time(nbytes: float, n: int, bw: float, latency: float, calls: int = 1) -> float:
    """All-gather (or reduce-scatter) of a buffer of ``nbytes`` in total."""
    return 0.0 if n == 1 else (n - 1) / n * nbytes / bw + calls * latency


def p2p_time(nbytes: float, bw: float, latency: float) -> float:
    return nbytes / bw + latency


def bubble_fraction(pp: int, micro_batches: int) -> float:
    """1F1B pipeline bubble: idle share of the step, (p-1)/(m+p-1)."""
    return (pp - 1) / (micro_batches + pp - 1)


def step_time(shape: ModelShape, layout: Layout, links: Links, sample_s: float, act_bytes: int = 2) -> dict:
    """Predicted step (seconds) and its terms for ``layout``; ``sample_s``: single-device compute per sequence.

    step = (m + p - 1) slots x (one micro-batch's compute on one stage + its TP all-reduces + 2 pipeline messages)
           + data-parallel gradient reduction (exposed part) + parameter all-gather + scalar latencies."""
    lay = layout
    tp_link = group_link(lay.tp, 1, links)
    dp_link = group_link(lay.dp, lay.tp, links)
    pp_link = group_link(lay.pp, lay.tp * lay.dp, links)
    # the slowest stage sets the pace: the first (embedding) or the last (head) carries the most traffic
    per_stage = [predicted_collectives(shape, lay, s, act_bytes) for s in {0, lay.pp - 1}]

    def cost(kind: str, fn, n: int, link: tuple[float, float]) -> float:
        return max(fn(c[kind][1], n, *link, c[kind][0]) if kind in c else 0.0 for c in per_stage)

    slots = lay.micro_batches + lay.pp - 1
    compute_mb = lay.micro_batch * sample_s / (lay.tp * lay.pp)  # one micro-batch on one stage, fwd + bwd
    terms = {
        "compute": lay.micro_batches * compute_mb,
        "tp_comm": slots * cost("tp_allreduce", allreduce_time, lay.tp, tp_link) / lay.micro_batches,
        "pp_p2p": slots * 2 * p2p_time(activation_numel(shape, lay.micro_batch) * PIPELINE_BYTES, *pp_link)
        if lay.pp > 1
        else 0.0,
        "pp_bubble": bubble_fraction(lay.pp, lay.micro_batches) * slots * compute_mb,
    }
    grad = cost("dp_grad_allreduce", allreduce_time, lay.dp, dp_link)
    if lay.overlap_grad_reduce:  # hidden behind backward (about 2/3 of compute) except the last bucket of the step
        p = max(params_per_rank(shape, lay.tp, lay.pp, s) for s in {0, lay.pp - 1})
        last_bucket = grad / (lay.micro_batches if lay.zero == 2 else 1) * min(1.0, REDUCE_BUCKET / p)
        grad = max(grad - 2 / 3 * terms["compute"], last_bucket)
    terms["dp_grad"] = grad
    terms["dp_allgather"] = cost("dp_param_allgather", allgather_time, lay.dp, dp_link)
    scalars = max(c.get("scalars", (0, 0))[0] for c in per_stage) + 1  # + the loop's stop-signal all-reduce
    terms["scalars"] = scalars * max(dp_link[1], tp_link[1]) if lay.gpus > 1 else 0.0
    total = sum(terms.values())
    return {
        "terms": terms,
        "step_s": total,
        "ideal_s": terms["compute"],
        "efficiency": terms["compute"] / total,
        "tokens_per_s": lay.micro_batches * lay.micro_batch * lay.dp * shape.seq_len / total,
    }


# --------------------------------------------------------------------------------------------------- layouts shown
def candidate_layouts(gpus: int, global_batch: int, micro_batch: int) -> list[Layout]:
    """The recipe's layout at ``gpus`` (slurm/owt_l4_128gpu.sh: tp=pp=1, ZeRO-1, micro-batch 4) and alternatives."""

    def lay(tp, pp, zero, note, overlap=False):
        dp = gpus // (tp * pp)
        return Layout(tp, pp, dp, zero, micro_batch, global_batch // (micro_batch * dp), overlap, note)

    return [
        lay(1, 1, 1, "recipe (ZeRO-1)"),
        lay(1, 1, 0, "ZeRO-0 (one all-reduce)"),
        lay(1, 1, 2, "ZeRO-2 + overlap_comm", overlap=True),
        lay(1, 1, 0, "ZeRO-0 + overlapped all-reduce*", overlap=True),
        lay(2, 1, 1, "TP=2 in node, ZeRO-1"),
        lay(1, 2, 1, "PP=2, ZeRO-1"),
    ]


def format_table(
    shape: ModelShape, links: Links, sample_s: float, global_batch: int, micro_batch: int, gpu_counts=(8, 32, 128)
) -> str:
    head = (
        "| GPUs | layout | tp | pp | dp | ZeRO | b x m | step ms | compute | tp comm | pp p2p+bubble | dp grad | "
        "dp gather | tokens/s | efficiency |"
    )
    rows = [head, "|" + "---|" * 15]
    for gpus in gpu_counts:
        for lay in candidate_layouts(gpus, global_batch, micro_batch):
            r = step_time(shape, lay, links, sample_s)
            t = {k: v * 1e3 for k, v in r["terms"].items()}
            mark = " ✓" if r["efficiency"] >= 0.9 else ""
            rows.append(
                f"| {gpus} | {lay.note} | {lay.tp} | {lay.pp} | {lay.dp} | {lay.zero} | "
                f"{lay.micro_batch} x {lay.micro_batches} | {r['step_s'] * 1e3:.1f} | {t['compute']:.1f} | "
                f"{t['tp_comm']:.2f} | {t['pp_p2p'] + t['pp_bubble']:.2f} | {t['dp_grad']:.2f} | "
                f"{t['dp_allgather']:.2f} | {r['tokens_per_s']:,.0f} | {r['efficiency']:.1%}{mark} |"
            )
    rows.append(
        "\n* not available in DeepSpeed's stage 0 (it reduces after backward): what an overlapped reducer "
        "(megatron-core DDP overlap_grad_reduce, torch DDP) would give; ZeRO-2 + overlap_comm needs "
        "zero_optimization.overlap_comm=true, which training/engine.py does not set"
    )
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------ measuring the real run
class CollectiveCounter(TorchDispatchMode):
    """Records every c10d collective dispatched while active: DeepSpeed's, megatron-core's and ours all reach
    torch's ``c10d::*`` ops (also those called from autograd hooks during backward), whatever Python path they took.
    ``groups``: {name: ranks} of the groups to recognise; each call is logged as (op, group name, payload bytes) where
    the payload is the full buffer (all-gather: the output; reduce-scatter: the input; otherwise the first tensors).
    Calls on single-rank groups move nothing and are skipped."""

    def __init__(self, groups: dict[str, tuple[int, ...]]):
        super().__init__()
        self.names = {tuple(r): n for n, r in groups.items()}
        self.calls: list[tuple[str, str, int, int]] = []  # (op, group, bytes, largest numel)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self._record(func.__name__.split(".")[0], args)
        return func(*args, **(kwargs or {}))

    def _record(self, op: str, args) -> None:
        import torch.distributed as dist

        pg = next((a for a in args if isinstance(a, torch.ScriptObject)), None)
        if pg is None:
            return
        ranks = tuple(dist.get_process_group_ranks(dist.ProcessGroup.unbox(pg)))
        if len(ranks) == 1:
            return
        tensors: list[torch.Tensor] = []

        def walk(a):
            if isinstance(a, torch.Tensor):
                tensors.append(a)
            elif isinstance(a, (list, tuple)):
                for b in a:
                    walk(b)

        walk(args[1] if op.startswith("_reduce_scatter_base") else args[0])
        self.calls.append(
            (
                op.rstrip("_"),
                self.names.get(ranks, f"ranks{ranks}"),
                sum(t.numel() * t.element_size() for t in tensors),
                max(t.numel() for t in tensors),
            )
        )


def classify(calls: list[tuple[str, str, int, int]]) -> dict[str, tuple[int, float]]:
    """Counted calls -> {kind: (calls, bytes)} in the kinds of :func:`predicted_collectives` (+ ``scalars``)."""
    out: dict[str, list] = {}
    for op, group, nbytes, numel in calls:
        if group == "dp" and op == "allreduce" and numel >= DP_GRAD_MIN_NUMEL:
            kind = "dp_grad_allreduce"
        elif group == "dp" and op == "_allgather_base":
            kind = "dp_param_allgather"
        elif group == "tp" and op == "allreduce" and numel > 1:  # 1 element: the model-parallel grad norm when pp=1
            # (a micro-batch with a single masked token would be filed as a scalar: the tests' batches have 9-20)
            kind = "tp_allreduce"
        elif group == "pp" and op in ("send", "recv"):
            kind = f"pp_{op}"
        else:
            kind = "scalars"
        c = out.setdefault(kind, [0, 0])
        c[0] += 1
        c[1] += nbytes
    return {k: (v[0], v[1]) for k, v in out.items()}


GLOO_LAYOUTS = [(1, 1, 2, 1), (1, 1, 2, 2), (2, 1, 1, 0), (1, 2, 1, 0), (2, 1, 2, 1), (1, 2, 2, 1)]  # tp, pp, dp, zero


def gloo_check(cache_dir: str, log_dir: str, layouts=GLOO_LAYOUTS) -> list[dict]:
    """Run one measured training step of the tests' tiny model (fp32, gloo) per layout and compare, for every rank,
    the counted calls and bytes per kind with :func:`predicted_collectives` (given the step's masked-token counts)."""
    from tests.dist_harness import run_ranks
    from tests.dist_workers import BASE, count_step_collectives

    m, t = BASE["model"], BASE["train"]
    shape = ModelShape(
        layers=m["num_layers"],
        hidden=m["hidden_size"],
        ffn=4 * m["hidden_size"],
        vocab=30522,
        seq_len=m["seq_len"],
        mean_t=0.5,
    )
    rows = []
    for tp, pp, dp, zero in layouts:
        layout = Layout(tp, pp, dp, zero, t["micro_batch_size"], t["global_batch_size"] // (t["micro_batch_size"] * dp))
        for r in run_ranks(count_step_collectives, tp * pp * dp, (tp, pp, dp, zero), cache_dir, log_dir):
            counted = classify(r["calls"])
            predicted = predicted_collectives(shape, layout, r["pp_rank"], 4, r["masked"])
            rows.append(
                {
                    "layout": (tp, pp, dp, zero),
                    "rank": r["rank"],
                    "stage": r["pp_rank"],
                    "counted": counted,
                    "predicted": predicted,
                }
            )
    return rows


def format_check(rows: list[dict]) -> str:
    out = [
        "| layout (tp,pp,dp,ZeRO) | rank | kind | counted calls | predicted calls | counted bytes | predicted bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for kind in sorted(set(r["counted"]) | set(r["predicted"])):
            c, p = r["counted"].get(kind, (0, 0)), r["predicted"].get(kind, ("-", "-"))
            pb = f"{p[1]:,.0f}" if p[1] != "-" else "-"
            out.append(f"| {r['layout']} | {r['rank']} | {kind} | {c[0]} | {p[0]} | {c[1]:,} | {pb} |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/owt_small_l4.yaml"))
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per GPU per micro-step (the slurm script's 4)")
    p.add_argument(
        "--step-ms",
        type=float,
        default=DEFAULT_STEP_MS,
        help="INPUT: measured single-device step time in ms (default: DESIGN.md §8's H100 figure)",
    )
    p.add_argument(
        "--measured-batch",
        type=int,
        default=DEFAULT_MEASURED_BATCH,
        help="sequences per step in the --step-ms measurement",
    )
    p.add_argument("--gpus", default="8,32,128")
    p.add_argument("--nvlink-gbps", type=float, default=Links.nvlink_gbps)
    p.add_argument("--ib-gbps", type=float, default=Links.ib_gbps)
    p.add_argument("--check-gloo", action="store_true", help="count the bytes of the real gloo run at 2 and 4 ranks")
    p.add_argument("--cache-dir", default=str(ROOT / "runs/cache"), help="packed-token cache for --check-gloo")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from bd3_megatron.config import ConfigError, load_config
    from data_pipeline.tokenizers import get_tokenizer

    try:
        gpu_counts = [int(g) for g in args.gpus.split(",")]
        if args.step_ms <= 0 or args.measured_batch < 1 or args.micro_batch < 1 or min(gpu_counts) < 1:
            raise ValueError
    except ValueError:
        print(
            "error: --step-ms must be > 0, --measured-batch/--micro-batch >= 1 and --gpus a comma list of GPU "
            "counts >= 1",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = load_config(args.config, [f"train.micro_batch_size={args.micro_batch}"])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    g = cfg.train.global_batch_size
    bad = [n for n in gpu_counts if g % (args.micro_batch * n)]
    if bad:
        print(
            f"error: global batch {g} is not a multiple of micro-batch {args.micro_batch} x GPUs for --gpus {bad}; "
            f"pick GPU counts that divide it",
            file=sys.stderr,
        )
        return 2
    shape = ModelShape.from_config(cfg, get_tokenizer(cfg.data.tokenizer).vocab_size)
    links = Links(nvlink_gbps=args.nvlink_gbps, ib_gbps=args.ib_gbps)
    sample_s = args.step_ms / 1e3 / args.measured_batch
    print(
        f"# INPUT single-device step: {args.step_ms:g} ms at batch {args.measured_batch} "
        f"({sample_s * 1e3:.3f} ms/sequence, {args.measured_batch * shape.seq_len / args.step_ms * 1e3:,.0f} "
        f"tokens/s); model {shape.layers}x{shape.hidden}, ffn {shape.ffn}, vocab {shape.vocab} "
        f"(padded {padded_vocab(shape, 1)} at tp=1), L={shape.seq_len} (2L in the network), bf16 "
        f"(2-byte gradients, parameters, activations); {params_per_rank(shape, 1, 1, 0) / 1e6:.1f}M parameters; "
        f"global batch {g}, micro-batch {args.micro_batch}"
    )
    print(
        f"# LINKS: {links.gpus_per_node} GPUs/node; NVLink {links.nvlink_gbps:g} GB/s per GPU per direction, "
        f"{links.intra_latency_us:g} us per call; InfiniBand {links.ib_gbps:g} GB/s per GPU, "
        f"{links.inter_latency_us:g} us per call"
    )
    print(
        "# no overlap of gradient reduction with backward unless the layout says overlap_comm (DeepSpeed's default "
        "for ZeRO 1/2 is off); efficiency = compute-only time / predicted step (weak scaling vs one GPU)"
    )
    for title, lk in (
        (
            "cross-node groups as NCCL rings: one channel per local member's NIC (k members/node -> "
            "k x IB, capped by NVLink)",
            links,
        ),
        (
            "pessimistic: every cross-node collective at the per-GPU InfiniBand rate (flat)",
            replace(links, flat_ib=True),
        ),
    ):
        print(f"\n## {title}")
        print(format_table(shape, lk, sample_s, g, args.micro_batch, gpu_counts))
    if args.check_gloo:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            rows = gloo_check(args.cache_dir, tmp)
        print("\n# gloo check: one training step of the tests' tiny model (4x32, L=16, fp32), every rank")
        print(format_check(rows))
        bad = [r for r in rows if r["counted"] != r["predicted"]]
        print(f"# {len(rows) - len(bad)}/{len(rows)} ranks: every kind matches the model exactly (calls and bytes)")
        if bad:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
