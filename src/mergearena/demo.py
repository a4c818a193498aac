"""The main job for now: build a small base model and two fine-tunes offline, merge them.

Later the zoo replaces these random models with SmolLM2 and real LoRA experts.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mergearena.engine import merge

DEMO_RECIPES: dict[str, dict] = {
    "linear": {"parameters": {}, "per_model": {"weight": 0.5}, "base": False},
    "task_arithmetic": {"parameters": {"lambda": 1.0}, "per_model": {"weight": 0.5}, "base": True},
    "ties": {"parameters": {}, "per_model": {"weight": 0.5, "density": 0.5}, "base": True},
    "dare_ties": {"parameters": {}, "per_model": {"weight": 0.5, "density": 0.5}, "base": True},
    "slerp": {"parameters": {"t": 0.5}, "per_model": {}, "base": True},
    "model_stock": {"parameters": {}, "per_model": {}, "base": True},
    "geometric_median": {"parameters": {}, "per_model": {}, "base": True},
}


def build_models(directory: Path) -> tuple[Path, list[Path]]:
    """A random Llama-style base (about 4M parameters) and two noisy "fine-tunes" of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base_dir = directory / "base"
    base.save_pretrained(base_dir)
    experts = []
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        expert = LlamaForCausalLM(config)
        with torch.no_grad():
            for (_, target), (_, source) in zip(
                expert.state_dict().items(), base.state_dict().items(), strict=True
            ):
                noise = torch.randn(source.shape, generator=generator) * 0.01
                target.copy_(source + noise)
        path = directory / f"expert-{seed}"
        expert.save_pretrained(path)
        experts.append(path)
    return base_dir, experts


def _recipe(method: str, base: Path, experts: list[Path]) -> dict:
    spec = DEMO_RECIPES[method]
    models = [{"model": str(path), "parameters": dict(spec["per_model"])} for path in experts]
    if method == "slerp":
        models = [{"model": str(base)}, {"model": str(experts[0])}]
    recipe = {
        "merge_method": method,
        "models": models,
        "parameters": spec["parameters"],
        "dtype": "float32",
        "seed": 0,
    }
    if spec["base"]:
        recipe["base_model"] = str(base)
    return recipe


def run_demo(workdir: Path | None, console: Console) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="mergearena-demo-") as scratch:
        directory = Path(workdir) if workdir else Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        base, experts = build_models(directory)
        console.print(
            f"built a random Llama base and two fine-tunes in {directory} "
            f"({time.perf_counter() - started:.1f} s)"
        )
        tokens = torch.arange(16).unsqueeze(0)
        table = Table(title="mergearena demo: two fine-tunes of one base, merged")
        for column in ("method", "tensors", "MiB", "seconds", "mean |merged - base|", "forward"):
            table.add_column(column)
        base_model = AutoModelForCausalLM.from_pretrained(base)
        base_params = dict(base_model.named_parameters())
        for method in DEMO_RECIPES:
            out = directory / f"merged-{method}"
            result = merge(_recipe(method, base, experts), out, overwrite=True)
            model = AutoModelForCausalLM.from_pretrained(out)
            with torch.no_grad():
                logits = model(tokens).logits
                distance = torch.stack(
                    [
                        (parameter - base_params[name]).abs().mean()
                        for name, parameter in model.named_parameters()
                    ]
                ).mean()
            table.add_row(
                method,
                str(result.tensors),
                f"{result.bytes / 2**20:.1f}",
                f"{result.seconds:.2f}",
                f"{distance:.5f}",
                "ok" if bool(torch.isfinite(logits).all()) else "NaN!",
            )
        console.print(table)
        console.print(
            "Each output is a Hugging Face checkpoint (config, sharded safetensors, model card, "
            "recipe) that transformers loaded and ran above. Try `mergearena methods`."
        )
