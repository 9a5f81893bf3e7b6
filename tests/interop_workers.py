"""Per-rank functions for the bd3lms interop distributed tests (module level so the forkserver can import them)."""

from __future__ import annotations


def init_from_then_step(rank: int, world: int, layout, cache_dir: str, run_dir: str, source: str) -> dict:
    """checkpoint.init_from=<source> (an HF bd3lms folder or a .ckpt) with model.arch=bd3lms on this layout: the
    step-0 validation NELBO, this rank's weights after the load, then three training steps' losses and the weights
    they leave."""
    from tests.dist_workers import gather_weights, trainer_for

    extra = [f"checkpoint.init_from={source}", "model.arch=bd3lms", "model.num_layers=2"]
    with trainer_for(layout, cache_dir, run_dir + "/log", extra) as trainer:
        trainer.maybe_resume()
        loaded = gather_weights(trainer)
        val = trainer.evaluate()
        losses = [trainer.train_step()["loss"] for _ in range(3)]
        trained = gather_weights(trainer)["params"]
        return dict(loaded, val=val, losses=losses, trained=trained, last_stage=trainer.ctx.is_last_stage)
