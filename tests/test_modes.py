"""The model modes: the registry, each mode's stream, mask and targets against direct definitions, and the
architecture rule that nothing outside the registry branches on a mode's name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bd3_megatron.config import ConfigError, load_config
from bd3_megatron.diffusion.schedule import ClipWindow
from bd3_megatron.modes import MODES, get_mode
from bd3_megatron.training.batches import BatchMaker

ROOT = Path(__file__).resolve().parents[1]
L, LB = 8, 2


def naive_mask(q: int, k: int, seq_len: int, block_size: int) -> bool:
    """The x_t ⊕ x mask of paper Fig. 2 written out case by case (queries/keys in [0, 2L))."""
    q_clean, k_clean = q >= seq_len, k >= seq_len
    qb, kb = (q % seq_len) // block_size, (k % seq_len) // block_size
    if not q_clean and not k_clean:
        return qb == kb  # noisy block attends its own noisy block
    if not q_clean and k_clean:
        return kb < qb  # ... and the clean blocks before it
    if q_clean and k_clean:
        return kb <= qb  # clean blocks are block-causal
    return False  # clean tokens never see noisy ones


def test_registry_names_every_mode_and_refuses_unknown_ones():
    assert set(MODES) == {"bd3", "mdlm", "ar", "sedd"} and all(get_mode(n).name == n for n in MODES)
    with pytest.raises(ValueError, match=r"model.mode must be one of bd3\|mdlm\|ar\|sedd, got 'xyz'"):
        get_mode("xyz")
    with pytest.raises(ConfigError, match="model.mode must be bd3|mdlm|ar|sedd"):
        load_config(None, ["model.mode=xyz"])


def test_modes_validate_their_config():
    with pytest.raises(ConfigError, match="model.mode=mdlm needs model.block_size = model.seq_len"):
        load_config(None, ["model.mode=mdlm", "model.seq_len=64", "model.block_size=4"])
    with pytest.raises(ConfigError, match="clip_search has no meaning for model.mode=ar"):
        load_config(None, ["model.mode=ar", "diffusion.clip_search=true"])
    load_config(None, ["model.mode=mdlm", "model.seq_len=64", "model.block_size=64"])


@pytest.mark.parametrize("name", ["bd3", "mdlm", "ar", "sedd"])
def test_each_mode_reads_its_stream_under_its_mask(name):
    mode = get_mode(name)
    xt, x0 = torch.arange(L)[None], 100 + torch.arange(L)[None]
    want_ids = {"bd3": torch.cat([xt, x0], 1), "mdlm": xt, "ar": x0, "sedd": xt}[name]
    assert torch.equal(mode.input_ids(xt, x0), want_ids) and want_ids.shape[1] == mode.streams * L
    block = L if name in ("mdlm", "sedd") else LB
    mask = mode.attention_mask(L, block, "sdpa", torch.device("cpu"))
    # bd3: the whole x_t ⊕ x mask; mdlm, sedd: its noisy half at L' = L (full attention); ar: its clean half at L' = 1
    offset, size, b = {"bd3": (0, 2 * L, LB), "mdlm": (0, L, L), "ar": (L, L, 1), "sedd": (0, L, L)}[name]
    want = torch.tensor([[naive_mask(offset + i, offset + j, L, b) for j in range(size)] for i in range(size)])
    assert torch.equal(mask, want)


def test_head_inputs_shift_only_for_ar():
    out = torch.arange(2 * L * 3, dtype=torch.float32).view(2, L, 3)
    mask = torch.ones(2, L, dtype=torch.bool)
    for name in ("bd3", "mdlm"):
        o, m = get_mode(name).head_inputs(out, mask)
        assert o is out and m is mask
    o, m = get_mode("ar").head_inputs(out, mask)
    assert torch.equal(o[:, 1:], out[:, :-1]) and not m[:, 0].any() and m[:, 1:].all() and mask.all()


def test_targets_per_mode():
    shape = ["model.seq_len=8", "model.block_size=2", "train.micro_batch_size=2", "train.global_batch_size=4"]
    cfg = load_config(None, shape)
    maker = BatchMaker(cfg, mask_token_id=99, device=torch.device("cpu"))
    x0 = torch.arange(16).view(2, 8)
    b = maker.corrupt(x0, torch.arange(2), step=3, window=ClipWindow(0.5, 0.5))
    assert torch.equal(b.xt[b.masked], torch.full_like(b.xt[b.masked], 99)) and torch.equal(
        b.xt[~b.masked], x0[~b.masked]
    )
    torch.testing.assert_close(b.weight, torch.where(b.masked, 2.0, 0.0))  # 1/t at t = 0.5, 0 when carried over
    cfg_ar = load_config(None, ["model.mode=ar", *shape])
    a = BatchMaker(cfg_ar, mask_token_id=99, device=torch.device("cpu")).corrupt(x0, torch.arange(2), step=3)
    assert torch.equal(a.xt, x0) and not a.masked[:, 0].any() and a.masked[:, 1:].all()
    torch.testing.assert_close(a.weight, torch.where(a.masked, 8 / 7, 0.0))  # mean NLL of the 7 predicted tokens


def test_nothing_outside_the_registry_branches_on_a_mode_name():
    """A new mode is one new module: the model, the training components and the tools ask the mode object."""
    pattern = re.compile(r"""mode\s*(==|!=)\s*["']|mode\s+(not\s+)?in\s*\(\s*["']|\[["']?(bd3|mdlm|ar)["']?\]\s*\[""")
    offenders = []
    for folder in ("bd3_megatron", "tools", "launcher"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.parent.name == "modes":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line.replace("wandb_mode", "")):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
