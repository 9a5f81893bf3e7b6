"""metrics.jsonl, the console progress line and optional Weights & Biases logging (logging rank only)."""

from __future__ import annotations

import collections
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any


class VarianceWatch:
    """Flags a sustained rise of the per-block NELBO variance (``nelbo_block_var``), not the single heavy-tailed steps
    of a healthy run.

    The rule: the median of the last ``recent`` finite values exceeds ``factor`` x the median of the up to
    ``history`` values before them (judged once ``min_history`` of those exist; factor 0 turns it off). Why medians:
    the 1/t weight makes one step's variance jump ~100-1000x whenever a block draws t near 1e-3 (a healthy run of the
    tiny config shows 3.7e4 against a typical 50), and a running mean either warns on those or is dragged up by
    them; a median over 5 steps ignores up to 2 such steps, while a real blow-up lifts it within 3 steps.
    """

    def __init__(self, factor: float, recent: int = 5, history: int = 100, min_history: int = 15):
        self.factor, self.recent, self.min_history = factor, recent, min_history
        self.values: collections.deque[float] = collections.deque(maxlen=recent + history)
        self.high = False  # the recent median is above the threshold now

    def update(self, value: float) -> str | None:
        """Add one step's variance. Returns the warning text when the recent median first crosses the threshold
        (None while it stays above, and after it falls back the watch re-arms); ``high`` tells every flagged step.
        Non-finite values (skipped steps) are ignored."""
        if not math.isfinite(value):
            return None
        self.values.append(value)
        values = list(self.values)
        past, now = values[: -self.recent], values[-self.recent :]
        if not self.factor or len(past) < self.min_history:
            return None
        recent_median, past_median = statistics.median(now), statistics.median(past)
        was_high, self.high = self.high, recent_median > self.factor * past_median
        if self.high and not was_high:
            return (
                f"per-block NELBO variance: median {recent_median:.4g} over the last {self.recent} steps is above "
                f"{self.factor:g}x its median {past_median:.4g} over the {len(past)} steps before (a sustained "
                f"rise, not one heavy-tailed step); check the loss, optim.lr and the data"
            )
        return None


class MetricsLogger:
    def __init__(
        self,
        log_dir: str | Path,
        enabled: bool,
        *,
        progress: bool = True,
        max_steps: int = 0,
        wandb_project: str | None = None,
        wandb_mode: str = "offline",
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.max_steps = max_steps
        self.tty = progress and sys.stdout.isatty()
        self.start = time.time()
        self._wandb = None
        if not enabled:
            return
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.dir / "metrics.jsonl", "a", buffering=1)
        if wandb_project:
            import wandb

            # WANDB_MODE in the environment (e.g. set by a Slurm site profile) wins over log.wandb_mode
            self._wandb = wandb.init(
                project=wandb_project, config=config, dir=str(self.dir), mode=os.environ.get("WANDB_MODE", wandb_mode)
            )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._fh.write(json.dumps(clean, sort_keys=True) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if k != "step"}, step=record["step"])
        self.print_progress(record)

    def print_progress(self, r: dict[str, Any]) -> None:
        step, total = r["step"], self.max_steps
        width = 24
        filled = int(width * step / total) if total else 0
        bar = "#" * filled + "." * (width - filled)
        parts = [f"[{bar}] step {step}/{total}"]
        if r.get("loss") is not None:
            parts.append(f"loss {r['loss']:.4f}")
        if "tokens_per_s" in r:
            parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
        if "val_nelbo" in r:
            parts.append(f"val_nelbo {r['val_nelbo']:.4f} val_ppl {r['val_ppl']:.2f}")
        parts.append(f"{time.time() - self.start:.0f}s")
        line = " | ".join(parts)
        if self.tty and "val_nelbo" not in r:
            print("\r" + line, end="", flush=True)
        else:
            print(("\n" if self.tty else "") + line, flush=True)

    def info(self, text: str) -> None:
        if self.enabled:
            print(("\n" if self.tty else "") + text, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self._wandb is not None:
                self._wandb.finish()
