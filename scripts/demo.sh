#!/usr/bin/env bash
# The main job: prepare everything, then merge small models offline and show what was done.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mergearena demo "$@"
