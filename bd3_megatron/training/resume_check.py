"""What may change when a run resumes from a checkpoint, compared before any tensor is loaded.

Three kinds of setting (the keys of bd3_megatron.config):

- FIXED: they change tensor shapes or what the weights mean (model sizes, the MLP width, the tokenizer and its
  vocabulary, the model family, the block size the weights were trained for, the sequence length and global batch
  that fix the data stream's rows and positions). A change is refused in one line naming key, old and new value.
- ALLOWED_CHANGES (``checkpoint.allow_changes``): the seed and the training data's identity. Changing them gives a
  valid run but not the continuation of the checkpoint's run (other noise, other data order or other data), so they
  are refused unless listed, and logged when listed.
- everything else (learning rate, schedule, eval and log settings, ...) may change freely: a deliberate choice that
  the new config states.
"""

from __future__ import annotations

from typing import Any

from bd3_megatron.checkpoint.sharded import CheckpointError
from bd3_megatron.config import Config

FIXED = (
    "model.num_layers",
    "model.hidden_size",
    "model.num_heads",
    "model.ffn_hidden_size",
    "model.seq_len",
    "model.block_size",
    "model.mode",
    "data.tokenizer",
    "train.global_batch_size",
    "diffusion.schedule",
)
_HINTS = {
    "model.block_size": "to fine-tune at another block size, start a new checkpoint.dir with "
    "checkpoint.init_from=<this checkpoint>",
    "train.global_batch_size": "the data stream's position is counted in samples of this batch size",
}
# what identifies the training data in a checkpoint's metadata["data"]: the prepared manifest's document hash when
# both sides have one (the folder may move), else the raw text source and its split counts
_DATA_HASH = ("documents_sha256", "train_rows", "train_tokens")
_DATA_TEXT = ("source", "num_docs", "train_docs", "train_tokens", "train_rows")


def _value(raw: dict[str, Any], key: str) -> Any:
    section, name = key.split(".")
    value = raw.get(section, {}).get(name)
    if key == "model.ffn_hidden_size" and value is None:  # null means 4 x hidden_size: compare the width
        value = 4 * raw["model"]["hidden_size"]
    return value


def data_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key old -> new`` for each identity field of the training data that differs (fields absent on either side,
    as in checkpoints written before a field existed, are not compared)."""
    keys = _DATA_HASH if "documents_sha256" in saved and "documents_sha256" in current else _DATA_TEXT
    return [
        f"{k} {saved[k]!r} -> {current[k]!r}" for k in keys if k in saved and k in current and saved[k] != current[k]
    ]


def check_data_order(path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a resume whose row order differs from the checkpoint's (data.shuffle / data.shuffle_window), never
    silently switching the order mid-run. A checkpoint without the keys predates them: it used the permutation."""
    for key, old_default in (("shuffle", "permutation"), ("shuffle_window", 0)):
        old, new = saved.get(key, old_default), current.get(key, old_default)
        if old != new:
            raise CheckpointError(
                f"{path} was trained with data.{key}={old} but this run has data.{key}={new}: the data order would "
                f"change mid-run; resume with data.{key}={old}"
            )


def check_resume(
    path, meta: dict[str, Any], cfg: Config, data_info: dict[str, Any], vocab_size: int, mask_token_id: int
) -> list[str]:
    """Raise CheckpointError (one line: key, checkpoint value, this run's value, the fix) for a setting this run may
    not change; return the log lines for the changes ``checkpoint.allow_changes`` accepts."""
    saved, now = meta["config"], cfg.to_dict()
    for key in FIXED:
        old, new = _value(saved, key), _value(now, key)
        if old is not None and old != new:
            hint = _HINTS.get(key, "it changes the model's tensors or what they mean")
            raise CheckpointError(
                f"{path} was trained with {key}={old} but this run has {key}={new}; resume with {key}={old} ({hint})"
            )
    for what, old, new in (
        ("vocabulary size", meta.get("vocab_size"), vocab_size),
        ("mask token id", meta.get("mask_token_id"), mask_token_id),
    ):
        if old is not None and old != new:
            raise CheckpointError(
                f"{path} was trained with {what} {old} but this run's tokenizer "
                f"({cfg.data.tokenizer}) has {new}; resume with the checkpoint's tokenizer"
            )
    allowed, notes = cfg.checkpoint.allow_changes, []
    old_seed = saved["train"]["seed"]
    if old_seed != cfg.train.seed:
        if "train.seed" not in allowed:
            raise CheckpointError(
                f"{path} was trained with train.seed={old_seed} but this run has "
                f"train.seed={cfg.train.seed}: noise and data order would not continue the "
                f"checkpoint's run; resume with train.seed={old_seed}, or set "
                f"checkpoint.allow_changes=[train.seed] to change it on purpose"
            )
        notes.append(
            f"note: train.seed {old_seed} -> {cfg.train.seed} (checkpoint.allow_changes): noise and data "
            f"order differ from the checkpoint's run from step {meta['step']} on"
        )
    check_data_order(path, meta.get("data", {}), data_info)
    diffs = data_differences(meta.get("data", {}), data_info)
    if diffs:
        where = f"{saved['data']['path']!r} -> {cfg.data.path!r}"
        if "data.path" not in allowed:
            raise CheckpointError(
                f"{path} was trained on other data than this run's (data.path {where}: "
                f"{'; '.join(diffs)}); resume on the same data, or set "
                f"checkpoint.allow_changes=[data.path] to change it on purpose"
            )
        notes.append(
            f"note: training data changed (checkpoint.allow_changes: data.path {where}: {'; '.join(diffs)});"
            f" the data stream continues at sample {meta.get('consumed_samples')} of the new data"
        )
    return notes


def zero_stage_change(meta: dict[str, Any], cfg: Config) -> tuple[int, int] | None:
    """(checkpoint's, this run's) ZeRO stage when they differ, else None. DeepSpeed's optimizer state of one stage
    does not load into another (it asserts), so such a resume is handled like a layout change."""
    old = meta["config"].get("parallel", {}).get("zero_stage", cfg.parallel.zero_stage)
    return (old, cfg.parallel.zero_stage) if old != cfg.parallel.zero_stage else None
