"""Config schema: YAML + dotted overrides, types, presets, and one clear error per mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bd3_megatron.config import ConfigError, config_from_dict, load_config, validate_layout

ROOT = Path(__file__).resolve().parents[1]


def test_required_keys_exist_and_overrides_apply():
    cfg = load_config(
        ROOT / "configs/tiny_cpu.yaml",
        ["model.block_size=8", "optim.lr=1e-3", "train.eval_interval=5", "checkpoint.dir=null"],
    )
    for key in (
        "model.block_size",
        "model.seq_len",
        "model.num_layers",
        "model.hidden_size",
        "model.num_heads",
        "train.max_steps",
        "train.seed",
        "train.micro_batch_size",
        "train.global_batch_size",
        "optim.lr",
        "checkpoint.dir",
        "checkpoint.interval",
        "parallel.tp",
        "parallel.pp",
        "parallel.zero_stage",
        "data.path",
        "log.dir",
        "log.interval",
        "train.eval_interval",
    ):
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name), key
    assert cfg.model.block_size == 8 and cfg.optim.lr == 1e-3 and cfg.checkpoint.dir is None
    assert isinstance(cfg.optim.lr, float)


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_presets_fill_sizes_but_explicit_keys_win():
    cfg = config_from_dict({"model": {"preset": "small"}})
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads) == (12, 768, 12)
    cfg = config_from_dict({"model": {"preset": "medium", "num_layers": 4}})
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (4, 1024)


@pytest.mark.parametrize(
    "raw,overrides,needle",
    [
        ({"model": {"hiden_size": 64}}, [], "did you mean 'model.hidden_size'"),
        ({"modle": {}}, [], "unknown config section 'modle'"),
        ({}, ["model.seq_len=100", "model.block_size=8"], "divisible by model.block_size"),
        ({}, ["model.num_layers=two"], "model.num_layers' must be int"),
        ({}, ["train.max_steps=1.5"], "train.max_steps' must be int"),
        ({}, ["model.dropout=true"], "model.dropout' must be float"),
        ({}, ["optim.lr=0"], "optim.lr must be a finite number > 0"),
        ({}, ["parallel.pp=2", "parallel.zero_stage=2"], "not supported with pipeline parallelism"),
        ({}, ["parallel.tp=5"], "num_heads (12) must be divisible by parallel.tp"),
        ({}, ["model.preset=huge"], "model.preset must be one of"),
        ({}, ["train.global_batch_size=12", "train.micro_batch_size=8"], "multiple of train.micro_batch_size"),
        ({}, ["diffusion.eps_min=0.5", "diffusion.eps_max=0.2"], "0 < eps_min <= eps_max <= 1"),
        (
            {},
            [
                "model.block_size=1",
                "model.seq_len=8",
                "diffusion.resample=true",
                "diffusion.eps_min=0.3",
                "diffusion.eps_max=0.8",
            ],
            "admits no masked-token count",
        ),
        (
            {},
            ["diffusion.clip_search=true", "train.eval_interval=100", "diffusion.clip_search_interval=250"],
            "must be a multiple of train.eval_interval",
        ),
        ({}, ["checkpoint.init_from_weights=last"], "checkpoint.init_from_weights must be ema|raw"),
        ({}, ["model.arch=dit"], "model.arch must be megatron|bd3lms"),
        ({}, ["log.variance_warn_factor=-1"], "log.variance_warn_factor must be >= 0"),
        ({"train": {"eval_batches": 4}}, [], "'train.eval_batches' was replaced by train.eval_rows"),
        ({}, ["diffusion.clip_search_batches=4"], "replaced by diffusion.clip_search_rows"),
        # issue 14: every size and count >= 1, every float finite, before any work
        ({}, ["train.global_batch_size=0"], "train.global_batch_size must be >= 1, got 0"),
        ({}, ["train.max_bad_steps=0"], "train.max_bad_steps must be >= 1"),
        ({}, ["model.ffn_hidden_size=0"], "model.ffn_hidden_size must be >= 1"),
        ({}, ["data.val_docs=0"], "data.val_docs must be >= 1"),
        ({}, ["train.seed=-1"], "train.seed must be >= 0"),
        ({}, ["sample.seed=-1"], "sample.seed must be >= 0"),
        ({}, ["optim.eps=0"], "optim.eps must be > 0"),
        ({}, ["optim.weight_decay=-0.1"], "optim.weight_decay must be >= 0"),
        ({}, ["optim.min_lr=1.0", "optim.lr=0.1"], "optim.min_lr must be in [0, optim.lr=0.1]"),
        ({}, ["diffusion.clip_search=true", "diffusion.clip_search_widths=[]"], "needs diffusion.clip_search_widths"),
        ({}, ["optim.lr=.nan"], "optim.lr must be a finite number, got nan"),
        ({}, ["optim.lr=inf"], "optim.lr must be a finite number, got inf"),
        ({}, ["optim.grad_clip=.inf"], "optim.grad_clip must be a finite number"),
        ({}, ["diffusion.eps_max=nan"], "diffusion.eps_max must be a finite number"),
        ({}, ["optim.betas=[0.9, .nan]"], "optim.betas must be a finite number"),
        ({}, ["log.variance_warn_factor=.inf"], "log.variance_warn_factor must be a finite number"),
        ({}, ["checkpoint.allow_changes=[model.hidden_size]"], "'model.hidden_size' cannot be allowed"),
        # issue 17: data at scale
        ({}, ["data.shuffle=random"], "data.shuffle must be feistel|permutation, got 'random'"),
        ({}, ["data.shuffle_window=-1"], "data.shuffle_window must be >= 0"),
        ({}, ["data.shuffle=permutation", "data.shuffle_window=4"], "data.shuffle_window needs data.shuffle=feistel"),
        ({}, ["data.cache_limit=20 parsecs"], "data.cache_limit: '20 parsecs' is not a byte size"),
        ({}, ["data.cache_limit=0"], "data.cache_limit must be > 0 bytes"),
        ({}, ["data.download_timeout=0"], "data.download_timeout must be > 0"),
        ({}, ["data.download_retry=-1"], "data.download_retry must be >= 0"),
        ({}, ["nodot=3"], "must be section.key"),
        ({}, ["model.block_size"], "not of the form"),
    ],
)
def test_bad_config_gives_one_clear_error(raw, overrides, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_layout_checks_need_world_size():
    cfg = config_from_dict({}, ["parallel.tp=2", "train.micro_batch_size=2", "train.global_batch_size=8"])
    assert validate_layout(cfg, 4) == 2
    with pytest.raises(ConfigError, match="not divisible by parallel.tp"):
        validate_layout(cfg, 3)
    cfg = config_from_dict({}, ["train.micro_batch_size=4", "train.global_batch_size=4"])
    with pytest.raises(ConfigError, match="multiple of micro_batch_size x data-parallel size"):
        validate_layout(cfg, 2)


def test_values_are_parsed_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError):
        config_from_dict({}, [f"model.num_layers=__import__('os').system('touch {marker}')"])
    assert not marker.exists()


def test_cli_reports_config_error_in_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.train", "--config", str(ROOT / "configs/tiny_cpu.yaml"), "model.hiden_size=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown config key 'model.hiden_size'"), proc.stderr[-500:]
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.train", "--config", str(tmp_path / "missing.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "config file not found" in proc.stderr


def test_every_float_of_the_schema_is_checked_finite():
    """The finite check walks the schema, so a float key added later is covered without a new line here."""
    import dataclasses
    import typing

    from bd3_megatron.config import Config

    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        for f in dataclasses.fields(cls):
            if "float" in str(typing.get_type_hints(cls)[f.name]):
                value = "[.nan]" if "list" in str(typing.get_type_hints(cls)[f.name]) else ".nan"
                with pytest.raises(ConfigError, match=f"{section.name}.{f.name} must be a finite number"):
                    config_from_dict({}, [f"{section.name}.{f.name}={value}"])


def test_allow_changes_accepts_the_listed_settings():
    cfg = config_from_dict({}, ["checkpoint.allow_changes=[train.seed, data.path]"])
    assert cfg.checkpoint.allow_changes == ["train.seed", "data.path"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_error_line_before_any_work(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.train",
            "--config",
            str(ROOT / "configs/tiny_cpu.yaml"),
            "parallel.device=cuda",
            f"checkpoint.dir={tmp_path / 'ckpt'}",
            f"log.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "error: parallel.device=cuda but no CUDA device is visible; use parallel.device=cpu or auto"
    assert "Traceback" not in proc.stderr and not (tmp_path / "ckpt").exists()  # refused before any work


def test_parse_bytes():
    from bd3_megatron.config import parse_bytes

    assert parse_bytes(123) == 123
    assert parse_bytes("20gb") == 20 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5tb") == 1.5e12
    assert parse_bytes("4096") == 4096
    for bad in ("", "gb", "-1gb", "1e3"):
        with pytest.raises(ValueError, match="not a byte size"):
            parse_bytes(bad)
