#!/usr/bin/env bash
# Create .venv and install bd3-megatron with every dependency from this repository's own pin files.
# Idempotent: a stamp of the pin files' hash skips a reinstall when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.bd3-installed"
want=$(cat requirements.txt requirements-data.txt requirements-dev.txt constraints.txt setup.py | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup_env: $VENV is up to date"; exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade "pip==25.3"
# torch first, alone: it must come from the pinned build, never a resolver's pick.
"${pip[@]}" -c constraints.txt torch==2.14.1 torchvision==0.29.1
"${pip[@]}" -c constraints.txt -r requirements.txt -r requirements-dev.txt
"${pip[@]}" --no-deps -r requirements-data.txt
"${pip[@]}" --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "setup_env: installed into $VENV"
