#!/usr/bin/env bash
# Prepare .venv with mergearena and its dependencies (--test: and the test tools). Idempotent;
# never downloads models.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # Install torch first and explicitly, so no other requirement makes the resolver pull the
    # multi-GB CUDA build. Without a GPU we want the CPU build: these machines have a local CPU
    # wheel for 2.13.0; elsewhere point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index or set
    # TORCH_SPEC to what your platform needs.
    if command -v nvidia-smi >/dev/null 2>&1; then
        .venv/bin/pip install --quiet "${TORCH_SPEC:-torch}"
    else
        .venv/bin/pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
    fi
fi
# The versions CI tested (constraints.txt), so a fresh machine does not pick up a release that
# changed behaviour since (transformers 5.24 renamed the KV-cache argument, for one). With
# `--test` (scripts/test.sh), the test tools too (pytest, ruff, mypy, import-linter, playwright,
# psycopg): the main job does not need them, and a fresh .venv/ is made faster without them.
if [ "${1:-}" = "--test" ]; then
    .venv/bin/pip install --quiet -c constraints.txt -e ".[test]"
else
    .venv/bin/pip install --quiet -c constraints.txt -e .
fi
