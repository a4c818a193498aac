#!/usr/bin/env bash
# Create bench/.venv-mergekit with mergekit 0.1.5, the reference tool for bench/merge_speed.py.
#
# Idempotent: an existing venv with the right versions is left alone; a partial one is completed.
# torch is installed first, pinned to the CPU build (torch==2.13.0 resolves to the local
# 2.13.0+cpu wheel), so that resolving mergekit's `torch>=2.0.0` never pulls CUDA wheels.
#
# Usage: bash bench/setup_mergekit.sh            (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-mergekit"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
MERGEKIT_VERSION="0.1.5"

have_versions() {
    [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/mergekit-yaml" ] || return 1
    "$VENV/bin/python" - "$TORCH_VERSION" "$MERGEKIT_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
torch_v, mk_v = sys.argv[1], sys.argv[2]
ok = version("torch").split("+")[0] == torch_v and version("mergekit") == mk_v
sys.exit(0 if ok else 1)
EOF
}

if have_versions; then
    echo "mergekit venv already set up: $VENV"
else
    if [ ! -x "$VENV/bin/python" ]; then
        echo "creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    PIP=("$VENV/bin/python" -m pip install --quiet)
    echo "installing torch==$TORCH_VERSION (CPU) ..."
    "${PIP[@]}" "torch==$TORCH_VERSION"
    echo "installing mergekit==$MERGEKIT_VERSION ..."
    # The constraint keeps the resolver from replacing the CPU torch with another build.
    CONSTRAINTS="$(mktemp)"
    trap 'rm -f "$CONSTRAINTS"' EXIT
    echo "torch==$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("torch"))')" \
        >"$CONSTRAINTS"
    "${PIP[@]}" -c "$CONSTRAINTS" "mergekit==$MERGEKIT_VERSION"
fi

# Sanity checks: the versions, no CUDA runtime wheels, and a working CLI.
"$VENV/bin/python" - <<'EOF'
import sys
from importlib.metadata import distributions, version
import torch
nvidia = sorted(d.metadata["Name"] for d in distributions() if d.metadata["Name"].lower().startswith("nvidia-"))
if nvidia or torch.version.cuda:
    sys.exit(f"CUDA packages found in the mergekit venv: {nvidia or torch.version.cuda}")
print(f"torch {torch.__version__}, mergekit {version('mergekit')}, transformers {version('transformers')}")
EOF
"$VENV/bin/mergekit-yaml" --help >/dev/null
echo "ok: $VENV/bin/mergekit-yaml"
