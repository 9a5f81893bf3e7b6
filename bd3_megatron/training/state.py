"""The run's progress, shared by the training components (the step, the checkpointer, the loop)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken; step s consumes global samples [s·G, (s+1)·G)
    skipped_steps: int = 0  # steps whose update was skipped (non-finite gradients); saved in checkpoints
    bad_steps: int = 0  # consecutive skipped steps; the loop stops at train.max_bad_steps
