#!/usr/bin/env bash
# The main job: prepare the embedded zoo, merge its LoRA experts with the recipes in recipes/,
# and rank base, experts and merges on the zoo's tasks (about 4 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mergearena demo "$@"
