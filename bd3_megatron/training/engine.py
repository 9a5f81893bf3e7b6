"""DeepSpeed ZeRO as the optimizer engine around a megatron-core model.

Two ways a step runs, chosen by the layout (both proven on CPU/gloo, see DESIGN.md §3):
  * pp == 1: DeepSpeed drives micro-batching (``gradient_accumulation_steps`` = micro-batches per step); each
    micro-batch's loss goes through ``engine.backward``; ZeRO stage 0, 1, 2 or 3.
  * pp > 1: megatron-core's pipeline schedule runs forward/backward over all micro-batches on ``engine.module``,
    then ``engine.allreduce_gradients()`` + ``engine.step()`` with ``gradient_accumulation_steps`` = 1; ZeRO-1
    (ZeRO-2's per-micro-batch reduction hooks conflict with a schedule that accumulates on its own).
The optimizer is torch's fused AdamW handed to DeepSpeed (CPU and CUDA), so no DeepSpeed op is JIT-compiled.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist

from bd3_megatron.config import Config
from bd3_megatron.parallel.mpu import MegatronMPU
from bd3_megatron.parallel.state import ParallelContext


def optimizer_state_classes() -> list:
    """Plain data classes inside a ZeRO optimizer state_dict, allowed when loading it with weights_only=True."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _skip_cpu_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory comm op (~80 s) at its first init on CPU; gloo does not need it."""
    import deepspeed.comm.torch  # noqa: F401  (the module object, not the torch it re-exports)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def local_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    """The gradients this rank contributes to the global norm: tensor-parallel shards on every TP rank, replicated
    tensors on TP rank 0 only (data-parallel replicas hold identical, already-averaged gradients), and tensors
    replicated over the pipeline (the time embedding) on the first stage only (``ds_pipe_replicated`` elsewhere)."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    return [
        p.grad
        for p in model.parameters()
        if p.grad is not None
        and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
        and not getattr(p, "ds_pipe_replicated", False)
    ]


def sum_pipeline_replicated_grads(model: torch.nn.Module) -> None:
    """Sum the gradients of parameters replicated on every pipeline stage (megatron's ``pipeline_parallel``
    attribute: the time embedding of time-conditioned models) over the pipeline group, so every stage's copy takes
    the same update, as megatron's ``finalize_model_grads`` does for conditional embedders. One all-reduce."""
    from megatron.core import parallel_state as ps

    grads = [p.grad for p in model.parameters() if getattr(p, "pipeline_parallel", False) and p.grad is not None]
    if not grads or ps.get_pipeline_model_parallel_world_size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=ps.get_pipeline_model_parallel_group())
    torch._foreach_copy_(grads, [piece.view_as(g) for piece, g in zip(flat.split([g.numel() for g in grads]), grads)])


NORM_PIECE = 32768  # elements per fp32 partial norm: short enough that fp32 accumulation stays at ~1e-8 relative


def global_grad_norm(model: torch.nn.Module) -> float:
    """L2 norm of the whole model's gradient across tensor- and pipeline-parallel ranks.

    fp32 norms of pieces of at most ``NORM_PIECE`` elements (views, one fused ``_foreach_norm`` pass: no fp64 copy
    of any gradient), then an fp64 sum of their squares and one all-reduce over the model-parallel group. Whole-tensor
    fp32 norms would drift by ~1e-5 on a 30K x 256 embedding gradient; pieces keep the result within ~1e-7 of an
    all-fp64 computation (tested at rel 1e-6). One host synchronisation (the float)."""
    from megatron.core import parallel_state as ps

    pieces = [piece for g in local_grads(model) for piece in g.detach().reshape(-1).split(NORM_PIECE)]
    device = next(model.parameters()).device
    if pieces:
        norms = torch._foreach_norm(pieces, 2.0, dtype=torch.float32)
        sq = torch.stack(norms).double().square().sum().reshape(1)
    else:  # a stage may hold no gradient (e.g. frozen), it still joins the all-reduce
        sq = torch.zeros(1, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size(ps.get_model_parallel_group()) > 1:
        dist.all_reduce(sq, group=ps.get_model_parallel_group())
    return float(sq.sqrt())


SAFE_MAGNITUDE = 1e30  # far below fp32/bf16 max (3.4e38): rounding and the bf16 cast cannot reach inf from here


class UpdateGuard:
    """Makes sure no applied optimizer step leaves a non-finite parameter or Adam moment, without per-step device work.

    Fast path (every normal step): a host-side bound, exact in real arithmetic with a 1e8 margin for rounding. For
    AdamW with finite inputs, |m'| <= max(|m|, |g|), v' <= max(v, g^2), |m'/(sqrt(v'/bc2)+eps)| <= |m'|/eps and
    |p'| <= |p| * |1 - lr*wd| + lr * |m'| / ((1 - beta1) * eps). |g| is at most the step's global grad norm after
    clipping (known before the step). The running maxima P, M, V are measured once (start, load, after a refused
    step: one fused inf-norm over parameters, fp32 masters and moments, one all-reduce) and then advanced on the host.
    While every bound stays below SAFE_MAGNITUDE the update cannot overflow, and the step is applied as usual.

    Exact path (only when the bound cannot prove it, e.g. optim.lr=1e37, or ZeRO without clipping, whose norm is
    known only inside DeepSpeed's step): copy every tensor the step mutates (module parameters, the optimizer's
    fp32 masters and state), step, measure (one all-reduce), and if anything is non-finite, or so large
    (>= SAFE_MAGNITUDE) that the next forward pass would overflow, on any rank, copy everything back and drop state the
    step created: the step is not applied, bit for bit, on every rank."""

    def __init__(self, engine, zero_stage: int, grad_clip: float):
        self.engine, self.zero_stage, self.grad_clip = engine, zero_stage, grad_clip
        self.bounds: tuple[float, float, float] | None = None  # (P, M, V); None: measure before the next step
        self.exact_steps = 0

    def _inner(self) -> torch.optim.Optimizer:
        opt = self.engine.optimizer
        return getattr(opt, "optimizer", opt)  # DeepSpeed's ZeRO/bf16 wrappers hold the torch AdamW

    def _tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(parameters incl. fp32 masters, exp_avg, exp_avg_sq, other state tensors) of this rank, deduplicated."""
        inner, seen, params = self._inner(), set(), []
        for t in [*self.engine.module.parameters(), *(q for g in inner.param_groups for q in g["params"])]:
            if id(t) not in seen and t.numel():  # (ZeRO-3 leaves empty placeholders in the module)
                seen.add(id(t))
                params.append(t.data)
        m, v, other = [], [], []
        for st in inner.state.values():
            for key, t in st.items():
                if torch.is_tensor(t):
                    (m if key == "exp_avg" else v if key == "exp_avg_sq" else other).append(t)
        return params, m, v, other

    def measure(self) -> tuple[float, float, float]:
        """Global max |.| of parameters, exp_avg, exp_avg_sq (inf if any is non-finite): one all-reduce."""
        params, m, v, _ = self._tensors()
        device = params[0].device
        vals = torch.stack(
            [
                torch.stack(torch._foreach_norm(group, float("inf"))).float().max()
                if group
                else torch.zeros((), device=device)
                for group in (params, m, v)
            ]
        )
        vals = torch.nan_to_num(vals, nan=float("inf"))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vals, op=dist.ReduceOp.MAX)
        return tuple(float(x) for x in vals.tolist())

    def _next_bounds(self, grad_bound: float | None) -> tuple[float, float, float] | None:
        """The bounds after this step if they prove it finite, else None."""
        if self.bounds is None:
            self.bounds = self.measure()
        group = self._inner().param_groups[0]
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if grad_bound is None or eps <= 0 or not math.isfinite(lr):
            return None
        p, m, v = self.bounds
        m, v = max(m, grad_bound), max(v, grad_bound * grad_bound)
        ratio = m / ((1 - beta1) * eps)  # bound of |m_hat / (sqrt(v_hat) + eps)|
        p = p * abs(1 - lr * wd) + lr * ratio
        ok = all(math.isfinite(x) and x < SAFE_MAGNITUDE for x in (p, ratio, v / (1 - beta2)))
        return (p, m, v) if ok else None

    def step(self, step_fn, grad_bound: float | None) -> bool:
        """Run ``step_fn`` (the optimizer step); returns False if it was refused (nothing changed)."""
        nxt = self._next_bounds(grad_bound)
        if nxt is not None:
            step_fn()
            self.bounds = nxt
            return True
        self.exact_steps += 1
        params, m, v, other = self._tensors()
        tensors = params + m + v + other
        backup = [t.clone() for t in tensors]
        state_before = set(self._inner().state)
        step_fn()
        measured = self.measure()
        if all(x < SAFE_MAGNITUDE for x in measured):  # (inf and NaN fail too: measure() maps NaN to inf)
            self.bounds = measured
            return True
        torch._foreach_copy_(tensors, backup)
        inner = self._inner()
        for key in [k for k in inner.state if k not in state_before]:
            del inner.state[key]  # moments the refused step created (first step): as if it never ran
        self.bounds = None
        return False


def deepspeed_config(cfg: Config, ctx: ParallelContext, dp: int, micro_batches: int, bf16: bool) -> dict:
    t, o = cfg.train, cfg.optim
    gas = micro_batches if ctx.pp == 1 else 1
    conf = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": t.micro_batch_size * gas * dp,
        # ZeRO clips with a TP/PP-aware global norm; for stage 0 the engine clips itself (DeepSpeed's stage-0 norm
        # would count pipeline-replicated tensors only on the first stage)
        "gradient_clipping": o.grad_clip if cfg.parallel.zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.zero_stage > 0:
        conf["zero_optimization"].update(reduce_bucket_size=5e7, allgather_bucket_size=5e7)
    return conf


class DeepSpeedEngine:
    """Same interface as the loop expects: begin_step / backward / step / state_dict."""

    def __init__(
        self, model: torch.nn.Module, cfg: Config, ctx: ParallelContext, dp: int, micro_batches: int, bf16: bool
    ):
        import deepspeed

        if not ctx.runtime.is_cuda:
            _skip_cpu_shm_build()
        o = cfg.optim
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=True
        )  # one vectorised pass per tensor, CPU and CUDA (~5x the loop on CPU)
        deepspeed.init_distributed(dist_backend=ctx.runtime.backend, auto_mpi_discovery=False)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=deepspeed_config(cfg, ctx, dp, micro_batches, bf16),
            mpu=MegatronMPU,
            dist_init_required=False,
        )
        self.zero_stage = cfg.parallel.zero_stage
        self.grad_clip = o.grad_clip
        self.pipeline = ctx.pp > 1
        self.micro_batches = micro_batches
        # With one data-parallel rank there is nothing to reduce: DeepSpeed would still flatten every gradient into a
        # bucket, all-reduce it over a group of one and copy it back (4-6% of a CPU step). ZeRO>=1 keeps its own path.
        self.reduce_gradients = not (dp == 1 and self.zero_stage == 0)
        if not self.reduce_gradients:
            self.engine.enable_backward_allreduce = False
        self.guard = UpdateGuard(self.engine, self.zero_stage, self.grad_clip)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        """pp == 1 path: one micro-batch's loss (DeepSpeed divides by the accumulation steps). DeepSpeed counts
        micro-batches through ``engine.step()``: called here for all but the last; :meth:`step` applies the update."""
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> tuple[float, bool]:
        """Apply the step after all micro-batches. Returns (global grad norm, applied). A non-finite gradient skips
        the update: ZeRO>=1 does that itself; for stage 0 the gradients are dropped before the optimizer sees them.
        An update that would leave a non-finite parameter or moment is not applied either (:class:`UpdateGuard`)."""
        if self.pipeline:
            sum_pipeline_replicated_grads(self.engine.module)
        if self.pipeline and self.reduce_gradients:
            self.engine.allreduce_gradients()
        if self.zero_stage == 0:
            norm = global_grad_norm(self.engine.module)
            if not math.isfinite(norm):
                self.engine.optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without gradients
                self.engine.step()
                return norm, False
            if self.grad_clip > 0 and norm > self.grad_clip:
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                torch._foreach_mul_(grads, self.grad_clip / (norm + 1e-6))
            return norm, self.guard.step(self.engine.step, min(norm, self.grad_clip) if self.grad_clip > 0 else norm)
        # ZeRO clips inside its step to at most grad_clip; without clipping the norm is unknown before the step
        applied = self.guard.step(self.engine.step, self.grad_clip if self.grad_clip > 0 else None)
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm, applied and math.isfinite(norm)

    # --------------------------------------------------------------- checkpoint state (this rank's shard)
    def state_dict(self) -> dict:
        return {
            "optimizer": self.engine.optimizer.state_dict(),
            "global_steps": self.engine.global_steps,
            "global_samples": self.engine.global_samples,
        }

    def load_state_dict(self, states: list[dict]) -> None:
        """``states``: the saved engine states of every data-parallel rank of this (tp, pp) position, in dp order."""
        state = states[self.engine.mpu.get_data_parallel_rank()] if self.engine.mpu else states[0]
        if self.zero_stage > 0:
            self.engine.optimizer.load_state_dict(
                [s["optimizer"] for s in states], load_optimizer_states=True, load_from_fp32_weights=True
            )
        else:
            self.engine.optimizer.load_state_dict(state["optimizer"])
        self.engine.global_steps = state["global_steps"]
        self.engine.global_samples = state["global_samples"]
        self.guard.bounds = None  # new parameters and moments: measure before the next step
