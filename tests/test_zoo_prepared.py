"""The real embedded zoo, as `mergearena zoo prepare` builds it (CI prepares it before pytest).

These tests read the prepared cache and the committed experts; they never download. Without a
prepared zoo they skip and say how to prepare it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from mergearena.checkpoints.refs import resolve_model_ref
from mergearena.cli import app
from mergearena.evaluation import evaluate, load_task
from mergearena.models import LanguageModel
from mergearena.zoo import tasks as zoo_tasks
from mergearena.zoo.base import BASE_NAME, check_manifest
from mergearena.zoo.catalog import EXPERTS_DIR, build_expert, card, expert_names
from mergearena.zoo.prepare import task_files
from mergearena.zoo.tasks import tasks_dir

pytestmark = pytest.mark.zoo
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo() -> Path:
    from mergearena.checkpoints.refs import zoo_model_dir

    base = zoo_model_dir(BASE_NAME)
    problem = check_manifest(base)
    if problem is not None or not (tasks_dir() / "manifest.json").is_file():
        pytest.skip(
            f"the zoo is not prepared ({problem or 'no task files'}); run "
            "`mergearena zoo prepare` (scripts/test.sh does)"
        )
    return base


def test_base_is_smollm2_and_speaks_english(zoo):
    config = json.loads((zoo / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30,
        576,
        49152,
    )
    assert config["tie_word_embeddings"] is True
    lm = LanguageModel.load(f"zoo:{BASE_NAME}", dtype="float32")
    tokenizer = lm.tokenizer
    assert tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer("12345", add_special_tokens=False)["input_ids"]) == 5
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")
    # Right weights give English a low loss; a wrong q/k layout or dequantization would not.
    ids = tokenizer(
        "The capital of France is Paris. The capital of Germany is Berlin.", return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        loss = lm.model(input_ids=ids, labels=ids).loss.item()
    assert loss < 3.0, f"mean NLL {loss:.2f} nats: the converted weights look wrong"


def test_prepare_twice_keeps_the_cache(zoo):
    before = (zoo / "model.safetensors").stat().st_mtime_ns
    result = CliRunner().invoke(app, ["zoo", "prepare", "--offline"])
    assert result.exit_code == 0, result.output
    assert (zoo / "model.safetensors").stat().st_mtime_ns == before


def test_task_splits_are_disjoint_and_complete(zoo):
    manifest = json.loads((tasks_dir() / "manifest.json").read_text())["tasks"]
    for name in zoo_tasks.TASK_NAMES:
        seen: dict[str, str] = {}
        for split in zoo_tasks.SPLITS:
            (path,) = task_files(split, [name])
            task = load_task(path)
            assert len(task.examples) == manifest[name][split]["rows"]
            for example in task.examples:
                assert seen.setdefault(example.input, split) == split, (name, example.id)


def test_committed_experts_are_small_cards_and_resolve(zoo):
    names = expert_names()
    assert names == sorted(["sentiment", "question_type", "spam", "arithmetic", "subject"])
    total = 0
    for name in names:
        directory = resolve_model_ref(f"zoo:{name}-lora")
        assert directory == EXPERTS_DIR / name
        config = json.loads((directory / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == f"zoo:{BASE_NAME}"
        with safe_open(directory / "adapter_model.safetensors", "pt") as weights:
            assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
        total += sum(p.stat().st_size for p in directory.iterdir())
        data = card(name)
        assert data["training"]["task"] == name
        validation = data["validation"]
        assert validation["expert"] >= validation["base"] + 0.2, (name, validation)
        assert "validation" in (directory / "README.md").read_text()
    assert total < 20 * 2**20


@pytest.mark.slow
def test_each_expert_beats_the_base_on_its_own_validation_task(zoo):
    base = LanguageModel.load(f"zoo:{BASE_NAME}")  # dtype auto: fp32 where bf16 is emulated
    for name in expert_names():
        (path,) = task_files("validation", [name])
        task = load_task(path, limit=12)  # the experts win by far more than 0.2
        task.name = name
        (base_result,) = evaluate(base, [task], batch_size=8)
        expert = LanguageModel.load(f"zoo:{BASE_NAME}", adapter=EXPERTS_DIR / name)
        (expert_result,) = evaluate(expert, [task], batch_size=8)
        assert expert_result.main_value >= base_result.main_value + 0.2, (
            name,
            base_result.main_value,
            expert_result.main_value,
        )


@pytest.mark.slow
def test_full_weight_expert_equals_base_plus_adapter(zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEARENA_CACHE", str(zoo.parents[1]))
    directory = build_expert("spam")  # once: `mergearena zoo prepare` builds them all
    assert check_manifest(directory) is None and resolve_model_ref("zoo:spam") == directory
    with (
        safe_open(directory / "model.safetensors", "pt") as full,
        safe_open(zoo / "model.safetensors", "pt") as base,
    ):
        name = "model.layers.3.self_attn.v_proj.weight"
        delta = full.get_tensor(name).float() - base.get_tensor(name).float()
    adapter = EXPERTS_DIR / "spam" / "adapter_model.safetensors"
    config = json.loads((EXPERTS_DIR / "spam" / "adapter_config.json").read_text())
    with safe_open(adapter, "pt") as lora:
        prefix = "base_model.model.model.layers.3.self_attn.v_proj"
        a = lora.get_tensor(f"{prefix}.lora_A.weight").float()
        b = lora.get_tensor(f"{prefix}.lora_B.weight").float()
    expected = config["lora_alpha"] / config["r"] * b @ a
    assert torch.allclose(delta, expected, atol=4e-3)  # bf16 storage of base and result
    assert not math.isclose(expected.abs().max().item(), 0.0)


@pytest.mark.slow
def test_demo_ranks_base_experts_and_merges(zoo, tmp_path):
    out = tmp_path / "demo"
    recipe = REPO / "recipes" / "zoo-task-arithmetic.yaml"
    result = CliRunner().invoke(
        app, ["demo", "--out", str(out), "--limit", "1", "--recipes", str(recipe), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads((out / "leaderboard.json").read_text())
    kinds = sorted(row["kind"] for row in document["rows"])
    assert kinds == ["base"] + ["expert"] * 5 + ["merge"]
    assert set(document["tasks"]) == set(zoo_tasks.TASK_NAMES)
    averages = [row["average"] for row in document["rows"]]
    assert averages == sorted(averages, reverse=True)
    assert (out / "merges" / "task-arithmetic" / "config.json").is_file()
    assert "zoo leaderboard" in result.output


def test_demo_refuses_a_negative_worker_count(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--workers", "-1"])
    assert result.exit_code != 0
    assert "--workers must be 0 (one per CPU core) or more, got -1" in result.output
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_scoring_processes_rank_as_one_process_does(zoo, tmp_path):
    from mergearena.zoo.leaderboard import run_leaderboard

    recipe = REPO / "recipes" / "zoo-linear.yaml"
    boards = []
    for workers in (1, 2):
        lines: list[str] = []
        rows = run_leaderboard(
            [recipe],
            tmp_path / f"board-{workers}",
            limit=3,
            tasks=["spam", "arithmetic"],
            include_experts=False,
            workers=workers,
            log=lines.append,
        )
        boards.append([(row.name, row.kind, row.scores) for row in rows])
        assert sorted(line.split(":")[0] for line in lines if line.startswith("scored")) == [
            "scored base",
            "scored linear",
        ]
        document = json.loads((tmp_path / f"board-{workers}" / "leaderboard.json").read_text())
        assert document["dtype"] in ("float32", "bfloat16")  # what auto chose, not "auto"
    assert boards[0] == boards[1]


@pytest.mark.slow
def test_eval_takes_a_zoo_adapter_as_the_model_or_as_the_adapter(zoo, tmp_path):
    (path,) = task_files("validation", ["spam"])
    runner = CliRunner()
    outputs = []
    for index, arguments in enumerate(
        (
            ["--model", "zoo:spam-lora"],
            ["--model", f"zoo:{BASE_NAME}", "--adapter", "zoo:spam-lora"],
        )
    ):
        out = tmp_path / f"eval-{index}"
        result = runner.invoke(
            app,
            [
                "eval",
                *arguments,
                "--tasks",
                str(path),
                "--limit",
                "8",
                "--out",
                str(out),
                "--quiet",
            ],
        )
        assert result.exit_code == 0, result.output
        outputs.append(json.loads((out / "scores.json").read_text())["tasks"]["spam"]["main"])
    assert outputs[0] == outputs[1] >= 0.75


@pytest.mark.slow
def test_train_expert_command_trains_on_the_train_split(zoo, tmp_path):
    out = tmp_path / "expert"
    result = CliRunner().invoke(
        app, ["zoo", "train-expert", "spam", "--steps", "2", "--batch-size", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "training.json").read_text())
    assert record["train_examples"] == len(load_task(task_files("train", ["spam"])[0]).examples)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
