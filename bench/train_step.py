"""Time the real training step (``launcher.train``'s code path, any TP/PP/DP layout) and, with ``--baseline``, a
plain-PyTorch model that computes what the reference code computes, interleaved in the same process.

    python bench/train_step.py --layers 4 --hidden 256 --heads 4 --seq-len 128 --block-size 4 --batch 8 \\
        --vocab bert-base-uncased --precision fp32 --device cpu --threads 1 --baseline
    torchrun --nproc-per-node 2 bench/train_step.py --config configs/owt_small_l4.yaml parallel.tp=2

The step is built exactly as ``launcher/train.py`` builds it (config + dotted overrides, ``state.initialize``,
``Trainer``) and ``Trainer.train_step()`` is called repeatedly: batch gathering and corruption, forward, backward,
clipping, optimizer step and EMA are all inside the timed region. The data is the embedded corpus; no checkpoints,
evaluation or metrics are written. Any config key can be set with ``section.key=value`` (they win over the flags).

Figures (one table and one JSON line, on global rank 0):
* ms/step: median and min-max of ``--steps`` timed steps after ``--warmup`` untimed ones, the device synchronised
  around each step; with several ranks each step's time is the slowest rank's.
* data tokens/s = global batch * L / median step time (L, not 2L: the clean copy is not data).
* executed FLOPs/step: one extra step counted with ``torch.utils.flop_counter.FlopCounterMode`` (forward +
  backward; matmuls and attention, summed over ranks). SDPA's CPU flash kernel, which torch does not count, gets
  torch's own SDPA formula. Attention is counted dense (2L x 2L) whatever the kernel, as torch counts it: the
  counted step runs the project's attention through SDPA (FlexAttention's skipped tiles are not subtracted).
* useful FLOPs/step = batch * (6 P_layers 2L + 6 V d L + 12 d n_layers (L^2 + L L')), with P_layers = n_layers
  (4 d^2 + 2 d d_ffn) the layers' matmul weights: both streams through the layers, the head on the L noisy positions
  (the formula's convention), and attention on the allowed (query, key) pairs of the BD3 mask only (L^2 + L L' per
  sequence per layer, 4 d FLOPs per pair forward, x3 with backward).
* MFU (CUDA only) = useful FLOP/s / (ranks * a bf16 8192^3 matmul rate measured in the same run); ``hfu`` the same
  with executed FLOPs.
* peak memory of one model's step: the bytes of the tensors that model owns at the start of a step (parameters,
  gradients, optimizer and EMA state, caches: every distinct storage on the device reachable from it), plus the
  highest allocation above the step's start during the step. CUDA: ``torch.cuda.max_memory_allocated`` after a
  reset, minus the allocated bytes at the start. CPU: ``torch.profiler`` with ``profile_memory=True`` over two steps,
  the running sum of the allocations and frees it records (a block freed in the measured step was allocated in the
  profiled step before it, so its free is seen); it measures tensor memory through torch's CPU allocator, not RSS.
  Max over ranks.
* ``--baseline`` (single process): :mod:`bench.reference_model` at the same sizes, vocabulary, precision, dropout and
  AdamW/LR/clipping/EMA settings; steps alternate (baseline first on even steps, the real step first on odd ones) so
  machine noise hits both alike. Ratios: per-pair median of tokens/s (baseline time / real time), executed FLOPs and
  peak memory (real / baseline).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the CPU memory profile's collector would log stage lines

import torch  # noqa: E402

from data_pipeline.tokenizers import SUPPORTED_TOKENIZERS  # noqa: E402

FLAG_KEYS = {
    "layers": "model.num_layers",
    "hidden": "model.hidden_size",
    "heads": "model.num_heads",
    "seq_len": "model.seq_len",
    "block_size": "model.block_size",
    "vocab": "data.tokenizer",
    "precision": "train.precision",
    "device": "parallel.device",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/train_step.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML recipe (default: built-in defaults, 12x768, L=1024, GPT-2)")
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--seq-len", type=int, help="L")
    p.add_argument("--block-size", type=int, help="L'")
    p.add_argument("--batch", type=int, help="global batch (sequences per optimizer step)")
    p.add_argument("--vocab", choices=SUPPORTED_TOKENIZERS)
    p.add_argument("--precision", choices=("fp32", "bf16"))
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=10, help="timed steps (>= 10 for the reported figures)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--baseline", action="store_true", help="also time the reference-equivalent plain-PyTorch model")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides, e.g. parallel.tp=2")
    args = p.parse_intermixed_args(argv)  # key=value overrides may stand between the flags
    for name in ("layers", "hidden", "heads", "seq_len", "block_size", "batch", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    return args


def bench_overrides(args: argparse.Namespace, log_dir: str, dp: int = 1) -> list[str]:
    """Overrides that make a launcher run a quiet benchmark, then the flags (``--batch`` split over ``dp``
    data-parallel ranks), then the user's key=value (last wins)."""
    out = [
        "data.path=embedded:sotu",
        "checkpoint.dir=null",
        "checkpoint.resume=none",
        "checkpoint.init_from=null",
        f"log.dir={log_dir}",
        "log.progress=false",
        "log.wandb=false",
        "train.eval_interval=0",
        "diffusion.clip_search=false",
        "sample.after_train=false",
        f"train.max_steps={2 * (args.warmup + args.steps) + 8}",
    ]  # timed + warm-up + counted + memory steps
    out += [f"{key}={getattr(args, name)}" for name, key in FLAG_KEYS.items() if getattr(args, name) is not None]
    if args.batch is not None:
        out += [f"train.global_batch_size={args.batch}", f"train.micro_batch_size={max(1, args.batch // dp)}"]
    return out + list(args.overrides)


def commit() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def useful_flops(batch: int, layers: int, hidden: int, ffn: int, vocab: int, seq_len: int, block: int) -> float:
    """The issue's useful FLOPs of one optimizer step (see the module doc)."""
    p_layers = layers * (4 * hidden * hidden + 2 * hidden * ffn)
    per_seq = (
        6 * p_layers * 2 * seq_len
        + 6 * vocab * hidden * seq_len
        + 12 * hidden * layers * (seq_len * seq_len + seq_len * block)
    )
    return float(batch * per_seq)


# ---------------------------------------------------------------------------------------------- measuring
def _sdpa_cpu_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def count_flops(step) -> int:
    """FLOPs of one call of ``step`` as torch's FlopCounterMode counts them, plus SDPA's CPU flash kernel."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    return int(counter.get_total_flops())


@contextlib.contextmanager
def sdpa_attention(module):
    """Run the project's attention through dense SDPA while FLOPs are counted: torch's counter cannot run
    FlexAttention (a higher-order op behind an internal compile) in the torch of the GPU machine, and it counts flex
    densely anyway, with the same formula as SDPA over the [2L, 2L] mask. Same function, same count."""
    spec = getattr(module, "spec", None)
    if spec is None or getattr(spec, "attention_backend", "sdpa") == "sdpa":
        yield
        return
    module.spec = dataclasses.replace(spec, attention_backend="sdpa")
    try:
        yield
    finally:
        module.spec = spec


def owned_tensor_bytes(roots, device: torch.device) -> int:
    """Bytes of the distinct storages on ``device`` reachable from ``roots`` through containers, object attributes
    and tensor ``.grad`` (Python modules, classes and functions are not followed, so globals of other models are
    not counted)."""
    skip = (
        types.ModuleType,
        type,
        types.FunctionType,
        types.BuiltinFunctionType,
        types.MethodType,
        str,
        bytes,
        int,
        float,
        bool,
        type(None),
    )
    seen, storages, stack = set(), {}, list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            for t in (obj, obj.grad if obj.is_leaf else None):
                if t is not None and t.device == device and t.untyped_storage().nbytes():
                    s = t.untyped_storage()
                    storages[s.data_ptr()] = s.nbytes()
            continue
        stack.extend(gc.get_referents(obj))
    return sum(storages.values())


_MEASURED = "bench::measured_step"


def step_peak_above_start(step, device: torch.device) -> int:
    """Highest tensor allocation above the start of one ``step`` call (see the module doc for CPU vs CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()  # blocks it allocates and the measured step frees are then known to the profiler
        with torch.profiler.record_function(_MEASURED):
            step()
    return _running_peak(prof)


def _running_peak(prof) -> int:
    """From the profiler's allocation records, the peak of live bytes during the ``_MEASURED`` range minus the live
    bytes at its start, counting only blocks allocated inside the profiled window (frees of older blocks are not
    recorded by torch)."""
    from torch._C._profiler import _EventType
    from torch.profiler import _utils

    events = list(_utils.traverse_dfs(prof.profiler.kineto_results.experimental_event_tree()))
    marks = [e for e in events if e.typed[0] == _EventType.TorchOp and e.name == _MEASURED]
    if len(marks) != 1:
        raise RuntimeError(f"the profiler recorded {len(marks)} measured-step ranges, expected 1")
    t_start = marks[0].start_time_ns
    allocs = sorted(
        (
            (e.start_time_ns, e.typed[1])
            for e in events
            if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu"
        ),
        key=lambda x: x[0],
    )
    live, size_of, at_start, peak, started = 0, {}, 0, 0, False
    for ts, a in allocs:
        if not started and ts >= t_start:
            started, at_start, peak = True, live, live
        if a.alloc_size > 0:
            size_of[a.ptr] = a.alloc_size
            live += a.alloc_size
        elif a.ptr in size_of:
            live -= size_of.pop(a.ptr)
        if started:
            peak = max(peak, live)
    return max(0, peak - at_start)


def matmul_rate(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """bf16 FLOP/s of an n^3 matmul on this GPU, timed with CUDA events (after 3 untimed ones)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (begin.elapsed_time(end) / 1e3)


# ---------------------------------------------------------------------------------------------- the two steps
class BaselineStep:
    """One training step of :class:`bench.reference_model.ReferenceBD3`: a fresh noisy batch, loss, backward, global
    gradient clipping, AdamW, EMA; the same optimizer settings as the config. AdamW as the reference gets it from
    torch's defaults on CPU (the per-tensor loop; the real step uses torch's fused CPU AdamW, part of its measured
    gain) and fused on CUDA (faster than the reference's default foreach there: a conservative baseline)."""

    def __init__(self, cfg, vocab_size: int, mask_token_id: int, device: torch.device, dtype: torch.dtype):
        from bd3_megatron.training.optim import EMA
        from bench.reference_model import ReferenceBD3

        m, o = cfg.model, cfg.optim
        if (m.ffn_hidden_size or 4 * m.hidden_size) != 4 * m.hidden_size or m.mode != "bd3":
            raise ValueError("--baseline needs model.mode=bd3 and the reference's MLP width 4 * hidden_size")
        self.cfg, self.device, self.vocab_size, self.mask_token_id = cfg, device, vocab_size, mask_token_id
        torch.manual_seed(cfg.train.seed)
        self.model = (
            ReferenceBD3(
                vocab_size,
                mask_token_id,
                m.num_layers,
                m.hidden_size,
                m.num_heads,
                m.seq_len,
                m.block_size,
                dropout=m.dropout,
                dtype=dtype,
            )
            .to(device)
            .train()
        )
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
            **({"fused": True} if device.type == "cuda" else {}),
        )
        self.named = dict(self.model.named_parameters())
        self.ema = EMA(self.named, o.ema) if o.ema > 0 else None
        self.gen = torch.Generator().manual_seed(cfg.train.seed)
        self.step_count = 0

    def __call__(self) -> None:
        from bd3_megatron.training.optim import lr_at
        from bench.reference_model import random_batch

        c = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step_count, c.optim, c.train.max_steps)
        xt, x0, t = random_batch(
            self.gen,
            c.train.global_batch_size,
            c.model.seq_len,
            c.model.block_size,
            self.vocab_size,
            self.mask_token_id,
            c.diffusion.eps_min,
            c.diffusion.eps_max,
            self.device,
        )
        self.model.loss(xt, x0, t).backward()
        if c.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.named)
        self.step_count += 1


def summarise(
    times_s: list[float], tokens: int, executed: float, useful: float, peak: int, owned: int, peak_rate: float | None
) -> dict:
    med = statistics.median(times_s)
    out = {
        "ms_median": med * 1e3,
        "ms_min": min(times_s) * 1e3,
        "ms_max": max(times_s) * 1e3,
        "ms_all": [round(t * 1e3, 3) for t in times_s],
        "tokens_per_s": tokens / med,
        "flops_executed": executed,
        "flops_useful": useful,
        "flop_s_executed": executed / med,
        "flop_s_useful": useful / med,
        "peak_memory_bytes": peak,
        "owned_bytes": owned,
        "mfu": None,
        "hfu": None,
    }
    if peak_rate:
        out["mfu"], out["hfu"] = useful / med / peak_rate, executed / med / peak_rate
    return out


def run(args: argparse.Namespace, log_dir: str) -> dict | None:
    from bd3_megatron.config import load_config
    from bd3_megatron.parallel import state
    from bd3_megatron.parallel.device import device_name
    from bd3_megatron.training.trainer import Trainer

    env = state.launch_env()
    if args.baseline and env.world_size > 1:
        raise ValueError("--baseline compares single-process steps; run it without torchrun (one process)")
    probe = load_config(args.config, bench_overrides(args, log_dir))  # the layout, to split --batch over DP ranks
    dp = max(1, env.world_size // (probe.parallel.tp * probe.parallel.pp))
    cfg = load_config(args.config, bench_overrides(args, log_dir, dp))
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = state.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed, cfg.parallel.device)
    trainer = None
    try:
        trainer = Trainer(cfg, ctx)
        device, dtype = ctx.runtime.device, ctx.runtime.compute_dtype(cfg.train.precision)
        vocab, mask_id = trainer.tokenizer.vocab_size, trainer.tokenizer.mask_token_id
        models = {"project": trainer.train_step}
        owners = {"project": [trainer]}
        if args.baseline:
            base = BaselineStep(cfg, vocab, mask_id, device, dtype)
            models["baseline"], owners["baseline"] = base, [base]

        def timed(name: str) -> float:
            ctx.runtime.synchronize()
            t0 = time.perf_counter()
            models[name]()
            ctx.runtime.synchronize()
            return time.perf_counter() - t0

        names = list(models)
        for i in range(args.warmup):
            for name in names if i % 2 == 0 else names[::-1]:
                timed(name)
        times = {name: [] for name in names}
        for i in range(args.steps):  # interleaved; the order alternates so neither model always runs second
            for name in names[::-1] if i % 2 == 0 else names:
                times[name].append(timed(name))
        with sdpa_attention(trainer.model):
            executed = {name: float(count_flops(models[name])) for name in names}
        peaks, owned = {}, {}
        for name in names:
            gc.collect()
            owned[name] = owned_tensor_bytes(owners[name], device)
            peaks[name] = owned[name] + step_peak_above_start(models[name], device)
        rate = matmul_rate(device) if ctx.runtime.is_cuda else None

        if ctx.world_size > 1:  # the job's step is its slowest rank's; FLOPs add up; memory is per rank (max)
            import torch.distributed as dist

            for name in names:
                t = torch.tensor(times[name], dtype=torch.float64, device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                times[name] = t.tolist()
                f = torch.tensor([executed[name]], dtype=torch.float64, device=device)
                dist.all_reduce(f)
                executed[name] = float(f)
                m = torch.tensor([peaks[name], owned[name]], dtype=torch.float64, device=device)
                dist.all_reduce(m, op=dist.ReduceOp.MAX)
                peaks[name], owned[name] = int(m[0]), int(m[1])
            if rate is not None:
                r = torch.tensor([rate], dtype=torch.float64, device=device)
                dist.all_reduce(r, op=dist.ReduceOp.MIN)
                rate = float(r)
        if ctx.rank != 0:
            return None
        m, t = cfg.model, cfg.train
        tokens = t.global_batch_size * m.seq_len
        useful = useful_flops(
            t.global_batch_size,
            m.num_layers,
            m.hidden_size,
            m.ffn_hidden_size or 4 * m.hidden_size,
            vocab,
            m.seq_len,
            m.block_size,
        )
        job_rate = rate * ctx.world_size if rate else None
        result = {
            name: summarise(times[name], tokens, executed[name], useful, peaks[name], owned[name], job_rate)
            for name in names
        }
        if args.baseline:
            pair = [b / p for b, p in zip(times["baseline"], times["project"])]
            result["ratios"] = {
                "tokens_per_s_pair_median": statistics.median(pair),
                "tokens_per_s_pair_min": min(pair),
                "tokens_per_s_pair_max": max(pair),
                "flops_executed": executed["project"] / executed["baseline"],
                "peak_memory": peaks["project"] / peaks["baseline"],
            }
        result["info"] = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": commit(),
            "device": str(device),
            "device_name": device_name(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "world_size": ctx.world_size,
            "tp": ctx.tp,
            "pp": ctx.pp,
            "dp": ctx.dp,
            "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
            "vocab_size": vocab,
            "tokenizer": cfg.data.tokenizer,
            "steps": args.steps,
            "warmup": args.warmup,
            "matmul_bf16_flop_s": rate,
            "attention_backend": m.attention_backend,
            "config": cfg.to_dict(),
        }
        return result
    finally:
        if trainer is not None:
            trainer.logger.close()
        state.shutdown()


def report(r: dict) -> None:
    i, c = r["info"], r["info"]["config"]
    m = c["model"]
    print(
        f"# train step bench: {m['num_layers']}x{m['hidden_size']} ({m['num_heads']} heads), L={m['seq_len']} "
        f"L'={m['block_size']}, batch {c['train']['global_batch_size']}, vocab {i['vocab_size']} ({i['tokenizer']}), "
        f"{i['precision']}, dropout {m['dropout']}, {i['device_name']} ({i['device']}), {i['threads']} thread(s), "
        f"tp={i['tp']} pp={i['pp']} dp={i['dp']}, {i['steps']} timed steps after {i['warmup']} warm-up, "
        f"torch {i['torch']}, commit {i['commit']}, {i['date']}"
    )
    if i["matmul_bf16_flop_s"]:
        print(f"bf16 matmul rate (8192^3, this run): {i['matmul_bf16_flop_s'] / 1e12:.1f} TFLOP/s per device")
    print(
        "\n| model | ms/step median | min-max | data tokens/s | executed GFLOP/step | useful GFLOP/step | "
        "executed TFLOP/s | MFU | peak memory MiB (owned) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    label = {"project": "this project (Trainer.train_step)", "baseline": "reference-equivalent (plain PyTorch)"}
    for name in ("project", "baseline"):
        if name not in r:
            continue
        s = r[name]
        mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "n/a (CPU)"
        print(
            f"| {label[name]} | {s['ms_median']:.1f} | {s['ms_min']:.1f}-{s['ms_max']:.1f} | "
            f"{s['tokens_per_s']:,.0f} | {s['flops_executed'] / 1e9:.1f} | {s['flops_useful'] / 1e9:.1f} | "
            f"{s['flop_s_executed'] / 1e12:.3f} | {mfu} | {s['peak_memory_bytes'] / 2**20:.0f} "
            f"({s['owned_bytes'] / 2**20:.0f}) |"
        )
    if "ratios" in r:
        q = r["ratios"]
        print(
            f"\nproject vs baseline: tokens/s x{q['tokens_per_s_pair_median']:.2f} (per-pair median, range "
            f"{q['tokens_per_s_pair_min']:.2f}-{q['tokens_per_s_pair_max']:.2f}), executed FLOPs "
            f"x{q['flops_executed']:.2f}, peak memory x{q['peak_memory']:.2f}"
        )
    print(json.dumps(r, sort_keys=True), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from bd3_megatron.cli import quiet_library_warnings
    from bd3_megatron.config import ConfigError

    quiet_library_warnings()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_train_step_") as log_dir:
            result = run(args, log_dir)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as exc:
        if "CUDA" not in str(exc) and "cuda" not in str(exc):
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    if result is not None:
        report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
