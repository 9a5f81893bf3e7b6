"""Checkpoint formats and the conversions between them.

* ``sharded`` — the training checkpoint: one folder per step, a file per (TP, PP, DP) rank, sha256 per file and a
  metadata digest, published by rename; resume, reshard to another layout, merge to full tensors.
* ``sampler`` — the single-device sampler folder (``model.safetensors`` + ``config.json``, native tensor names).
* ``hf`` — the reference bd3lms Hugging Face layout, both ways.
* ``from_training`` — a training checkpoint (any layout) gathered into a sampler checkpoint.
"""
