"""Train one zoo expert: a PEFT LoRA adapter on the base model, for one task's train split.

Each training example is exactly what the evaluator scores: the prompt's tokens as
``encode_prompts`` makes them, followed by the answer's tokens — the right choice as
``encode_choices`` makes it for multiple choice, the reference text and EOS for generation (so
greedy decoding learns to stop). The loss is the mean cross-entropy over answer tokens only.
Runs on CPU (float32) or CUDA (float32 weights, bf16 autocast); a seed fixes the LoRA
initialisation, the dropout and the order of examples.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mergearena.checkpoints.writer import atomic_directory, save_safetensors
from mergearena.errors import TaskError
from mergearena.evaluation.runner import render_prompt
from mergearena.evaluation.scoring import encode_choices, encode_prompts
from mergearena.evaluation.tasks import GENERATION, Task
from mergearena.models import LanguageModel, quiet_transformers

ADAPTER_WEIGHTS = "adapter_model.safetensors"
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainSettings:
    """Hyperparameters of one expert; recorded in its card."""

    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.06
    weight_decay: float = 0.0
    rank: int = 4
    alpha: int = 8
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LINEAR_MODULES))
    max_length: int = 384
    seed: int = 0


def training_pairs(lm: LanguageModel, task: Task, max_length: int) -> list[tuple[list[int], int]]:
    """(token ids, number of answer tokens at the end) per train example."""
    examples = list(task.examples)
    chat = task.settings.chat_template
    texts = [render_prompt(lm, task, example, chat) for example in examples]
    prompts = encode_prompts(lm, texts, special_tokens=not chat)  # as evaluate_task does
    eos = lm.tokenizer.eos_token_id
    pairs = []
    for example, prompt in zip(examples, prompts, strict=True):
        if example.target is None:
            raise TaskError(
                f"task {task.name}, example {example.id}: no target to train on; give every "
                f"training example a target"
            )
        if example.eval_type == GENERATION:
            answer = lm.tokenizer(example.target, add_special_tokens=False)["input_ids"] + [eos]
        else:
            choice = example.choices[int(example.target)]
            answer = encode_choices(lm, [[choice]], "loglik")[0][0]
        keep_prompt = max(1, max_length - len(answer))
        pairs.append((prompt[-keep_prompt:] + answer, len(answer)))
    return pairs


def _batch(pairs: list[tuple[list[int], int]], pad_id: int, device: torch.device):
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    for row, (tokens, answer_length) in enumerate(pairs):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        answer = slice(len(tokens) - answer_length, len(tokens))
        labels[row, answer] = ids[row, answer]
    return ids.to(device), mask.to(device), labels.to(device)


def _learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    warmup = max(1, round(settings.warmup_fraction * settings.steps))
    if step < warmup:
        return settings.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, settings.steps - warmup)
    return settings.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_expert(
    base: Path,
    task: Task,
    out: Path,
    settings: TrainSettings,
    *,
    device: str = "cpu",
    base_ref: str = "zoo:smollm2-135m",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train, then write the adapter (bf16 weights) and ``training.json`` into ``out``."""
    from peft import LoraConfig, get_peft_model  # slow to import: only when training

    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    lm = LanguageModel.load(str(base), device=device, dtype="float32")
    pairs = training_pairs(lm, task, settings.max_length)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    with quiet_transformers():
        model = get_peft_model(lm.model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    use_autocast = lm.device.type == "cuda"
    order: list[int] = []
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(settings.steps):
        if len(order) < settings.batch_size:
            epoch = list(range(len(pairs)))
            random.shuffle(epoch)
            order.extend(epoch)
        batch = [pairs[i] for i in order[: settings.batch_size]]
        del order[: settings.batch_size]
        ids, mask, labels = _batch(batch, pad_id, lm.device)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, settings)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0 or step == settings.steps - 1:
            recent = losses[-25:]
            log(
                f"{task.name} step {step + 1}/{settings.steps} loss {sum(recent) / len(recent):.4f}"
            )
    seconds = time.perf_counter() - started
    record = {
        "task": task.name,
        "base_model": base_ref,
        "train_examples": len(pairs),
        "epochs": round(settings.steps * settings.batch_size / len(pairs), 2),
        "settings": asdict(settings),
        "device": str(lm.device) + (f" ({torch.cuda.get_device_name()})" if use_autocast else ""),
        "seconds": round(seconds, 1),
        "loss_first_25": round(sum(losses[:25]) / len(losses[:25]), 4),
        "loss_last_25": round(sum(losses[-25:]) / len(losses[-25:]), 4),
    }
    with atomic_directory(out, overwrite=overwrite) as staging:
        model.save_pretrained(str(staging))
        _finish_adapter(staging, base_ref)
        (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _finish_adapter(directory: Path, base_ref: str) -> None:
    """Store the adapter in bf16 (half the bytes; the zoo commits these files) and name its base
    as a zoo reference so ``mergearena merge`` and ``eval --adapter`` find it offline."""
    weights_path = directory / ADAPTER_WEIGHTS
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights_path).items()}
    save_safetensors(weights, weights_path)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_ref
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for extra in ("README.md",):  # PEFT's template card; ours is written from the results
        (directory / extra).unlink(missing_ok=True)
