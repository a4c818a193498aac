"""Routed LoRA experts: building, the manifest, routing per prompt and per token, and scoring."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergearena.arena.policy import count_parameters as arena_count_parameters
from mergearena.checkpoints.lora import LoraAdapter
from mergearena.checkpoints.routed import count_parameters, read_manifest
from mergearena.cli import app
from mergearena.errors import CheckpointError, TaskError
from mergearena.evaluation import Task, evaluate, load_task, scoring
from mergearena.models import LanguageModel
from mergearena.routed.build import build_routed

COLUMNS = ("id", "input", "target", "answer_choices", "eval_type")
# Two "tasks" of disjoint words: the prompt router must tell their prompts apart.
WORDS = {
    "a": "water people day way".split(),
    "b": "number word time write".split(),
}
CHOICES = "['the long way', 'a number', 'no']"


def _sentence(words: list[str], rng: random.Random) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(8, 12)))


def write_rows(path: Path, rows: list[tuple[str, ...]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path


def task_rows(kind: str, count: int, seed: int, generation: int = 0) -> list[tuple[str, ...]]:
    rng = random.Random(seed)
    rows = [
        (f"{kind}{seed}-{k}", _sentence(WORDS[kind], rng), str(k % 3), CHOICES, "multiple_choice")
        for k in range(count)
    ]
    rows += [
        (f"{kind}{seed}-g{k}", _sentence(WORDS[kind], rng), "the way", "", "generation")
        for k in range(generation)
    ]
    return rows


@pytest.fixture
def experts(tmp_path, make_checkpoint, make_lora):
    """A tiny base, two LoRA experts on it, and each expert's calibration file."""
    base = make_checkpoint("llama", seed=0)
    targets = ("q_proj", "v_proj", "down_proj")
    adapters = [make_lora(base, seed=1, targets=targets), make_lora(base, seed=2, targets=targets)]
    calibration = [write_rows(tmp_path / f"{k}.csv", task_rows(k, 8, seed=10)) for k in WORDS]
    return base, adapters, calibration


def mixed_task(tmp_path: Path) -> tuple[Task, list[int]]:
    """Rows of both kinds interleaved (MC and generation), and the expert each row belongs to."""
    a, b = task_rows("a", 4, seed=20, generation=1), task_rows("b", 4, seed=21, generation=1)
    rows = [row for pair in zip(a, b, strict=True) for row in pair]
    path = write_rows(tmp_path / "mixed.csv", rows)
    (tmp_path / "mixed.yaml").write_text("max_new_tokens: 8\n")
    return load_task(path), [k % 2 for k in range(len(rows))]


def scores_of(lm: LanguageModel, task: Task, batch_size: int | str = 4) -> dict[str, object]:
    result = evaluate(lm, [task], batch_size=batch_size)[0]
    return {
        r.example.id: r.scores if r.scores is not None else r.prediction for r in result.examples
    }


def assert_same_scores(got: dict[str, object], expected: dict[str, object]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, tuple):
            assert got[key] == pytest.approx(value, abs=1e-4), key
        else:
            assert got[key] == value, key


def each_with_its_expert(base: Path, adapters: list[Path], task: Task, owners: list[int]):
    """Scores of each row alone, on the base with its expert's adapter merged in."""
    expected: dict[str, object] = {}
    for expert, adapter in enumerate(adapters):
        lm = LanguageModel.load(base, adapter=adapter, dtype="float32")
        for example, owner in zip(task.examples, owners, strict=True):
            if owner == expert:
                alone = Task(task.name, [example], task.settings, task.path)
                expected.update(scores_of(lm, alone, batch_size=1))
    return expected


# ------------------------------------------------------------------------------- per-prompt routing


def test_prompt_router_picks_the_expert_whose_calibration_matches(tmp_path, experts):
    base, adapters, calibration = experts
    out = build_routed(
        str(base), [str(a) for a in adapters], tmp_path / "routed", calibration=calibration
    )
    assert [e.name for e in out.experts] == [a.name for a in adapters]
    lm = LanguageModel.load(tmp_path / "routed", dtype="float32")
    for expert, kind in enumerate(WORDS):
        prompts = [row[1] for row in task_rows(kind, 6, seed=30 + expert)]  # unseen prompts
        encoded = lm.tokenizer(prompts, return_tensors="pt", padding=True)
        routed = lm.model.route(encoded["input_ids"], encoded["attention_mask"])
        assert routed.tolist() == [expert] * len(prompts)


@pytest.mark.parametrize("fallback", [False, True], ids=["shared-cache", "copied-cache"])
def test_mixed_batch_scores_as_each_example_alone_with_its_expert(
    tmp_path, experts, monkeypatch, fallback
):
    """Prompt and choices run on the prompt's expert, whatever else shares the batch; also when
    the scorer copies and re-selects the prompt cache instead of sharing it."""
    base, adapters, calibration = experts
    build_routed(str(base), [str(a) for a in adapters], tmp_path / "r", calibration=calibration)
    task, owners = mixed_task(tmp_path)
    expected = each_with_its_expert(base, adapters, task, owners)
    if fallback:
        monkeypatch.setattr(scoring, "_shared_prompt_cache", lambda cache, owner: None)
    routed = LanguageModel.load(tmp_path / "r", dtype="float32")
    assert_same_scores(scores_of(routed, task, batch_size=8), expected)


@pytest.mark.parametrize("router", ["prompt", "arrow"])
def test_one_expert_equals_the_base_with_that_adapter(tmp_path, experts, router):
    base, adapters, calibration = experts
    build_routed(
        str(base),
        [str(adapters[0])],
        tmp_path / "one",
        router=router,
        calibration=calibration[:1],
        top_k=1,
    )
    task, _ = mixed_task(tmp_path)
    merged = LanguageModel.load(base, adapter=adapters[0], dtype="float32")
    routed = LanguageModel.load(tmp_path / "one", dtype="float32")
    assert_same_scores(scores_of(routed, task), scores_of(merged, task))


# -------------------------------------------------------------------------------- per-token (Arrow)


def _loglik_without_cache(lm: LanguageModel, prompt: list[int], choice: list[int]) -> float:
    """log P(choice | prompt) from one pass over prompt + choice, no KV cache."""
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([prompt + choice]), use_cache=False).logits[0]
    logprobs = logits.float().log_softmax(-1)
    return sum(float(logprobs[len(prompt) + k - 1, t]) for k, t in enumerate(choice))


def test_arrow_scores_from_the_prompt_cache_as_without_it(tmp_path, experts):
    """Arrow mixes experts per token, so the shared prompt cache changes no score."""
    base, adapters, _ = experts
    build_routed(str(base), [str(a) for a in adapters], tmp_path / "arrow", router="arrow")
    lm = LanguageModel.load(tmp_path / "arrow", dtype="float32")
    task, _ = mixed_task(tmp_path)
    rows = [e for e in task.examples if e.eval_type == "multiple_choice"]
    prompts = scoring.encode_prompts(lm, [e.input for e in rows])
    choices = scoring.encode_choices(lm, [list(e.choices) for e in rows], "loglik")
    cached = scoring.score_choices(lm, prompts, choices, batch_size=3)
    for prompt, group, score in zip(prompts, choices, cached, strict=True):
        plain = [_loglik_without_cache(lm, prompt, choice) for choice in group]
        assert score.scores == pytest.approx(plain, abs=1e-4)
    # The experts do something: the routed scores are not the base's.
    plain = scoring.score_choices(LanguageModel.load(base, dtype="float32"), prompts, choices)
    routed_scores, base_scores = (torch.tensor([s.scores for s in r]) for r in (cached, plain))
    assert not torch.allclose(routed_scores, base_scores, atol=1e-3)


# ----------------------------------------------------------------------- full fine-tunes as experts


def test_full_fine_tune_enters_as_its_low_rank_delta(tmp_path, experts):
    """A full fine-tune whose delta is rank 4 comes back exactly: the routed model with it
    scores as the base with the LoRA it was made from."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapters, calibration = experts
    full = tmp_path / "full"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapters[1]).merge_and_unload().save_pretrained(full)
    AutoTokenizer.from_pretrained(base).save_pretrained(full)

    manifest = build_routed(
        str(base),
        [str(adapters[0]), str(full)],
        tmp_path / "r",
        calibration=calibration,
    )
    compressed = manifest.experts[1]
    assert compressed.rank == 4 and compressed.captured == pytest.approx(1.0, abs=1e-5)
    with LoraAdapter.open(tmp_path / "r" / compressed.adapter) as got:
        with LoraAdapter.open(adapters[1]) as original:
            assert got.modules.keys() == original.modules.keys()
            for name in original.modules:
                want = original.factors(name).delta()
                assert torch.allclose(got.factors(name).delta(), want, atol=1e-5), name
    task, owners = mixed_task(tmp_path)
    expected = each_with_its_expert(base, adapters, task, owners)
    routed = LanguageModel.load(tmp_path / "r", dtype="float32")
    assert_same_scores(scores_of(routed, task), expected)


# ------------------------------------------------------------------------ manifest and parameters


def _numel(*files: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for file in files for t in load_file(file).values())


def test_manifest_round_trips_and_parameters_count_base_and_every_adapter(
    tmp_path, experts, make_lora
):
    base, adapters, calibration = experts
    out = tmp_path / "routed"
    built = build_routed(
        str(base), [str(a) for a in adapters], out, calibration=calibration, calibration_rows=5
    )
    document = json.loads((out / "routed.json").read_text())
    assert document["format"] == "mergearena-routed-lora"
    assert document["base"] == str(base.resolve())
    assert [e["adapter"] for e in document["experts"]] == [f"experts/{a.name}" for a in adapters]
    assert document["router"]["kind"] == "prompt"
    assert document["router"]["calibration_rows"] == 5
    assert read_manifest(out) == built
    (out / "routed.json").write_text(json.dumps(read_manifest(out).model_dump()))
    assert read_manifest(out) == built

    adapter_files = [out / e.adapter / "adapter_model.safetensors" for e in built.experts]
    expected = _numel(base / "model.safetensors", *adapter_files, out / "centroids.safetensors")
    assert count_parameters(out) == expected
    assert arena_count_parameters(out) == expected  # what the arena checks against its limit
    base_only = _numel(base / "model.safetensors")
    assert expected - base_only == _numel(*adapter_files) + 2 * 32  # two centroids of hidden 32

    arrow = build_routed(str(base), [str(a) for a in adapters], tmp_path / "a", router="arrow")
    assert read_manifest(tmp_path / "a") == arrow
    assert arrow.router.kind == "arrow" and arrow.router.top_k == 2
    assert count_parameters(tmp_path / "a") == base_only + _numel(*adapter_files)

    # Arrow with GenKnowSub: the general adapter is stored beside the experts and counted too.
    general = make_lora(base, seed=5, targets=("q_proj", "v_proj", "down_proj"))
    gks = build_routed(
        str(base),
        [str(a) for a in adapters],
        tmp_path / "g",
        router="arrow",
        general=[str(general)],
    )
    assert gks.router.general == [f"general/{general.name}"]
    assert count_parameters(tmp_path / "g") == base_only + _numel(*adapter_files) * 3 // 2
    lm = LanguageModel.load(tmp_path / "g", dtype="float32")
    with torch.inference_mode():
        assert torch.isfinite(lm.model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_route_command_builds_a_model_that_eval_scores(tmp_path, experts):
    base, adapters, calibration = experts
    out = tmp_path / "routed"
    args = ["route", "--base", str(base), "--out", str(out), "--calibration-rows", "4"]
    for adapter, file in zip(adapters, calibration, strict=True):
        args += ["--expert", str(adapter), "--calibration", str(file)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "parameters" in result.output and read_manifest(out).router.calibration_rows == 4
    task_file = write_rows(tmp_path / "mixed.csv", task_rows("a", 3, seed=5, generation=1))
    (tmp_path / "mixed.yaml").write_text("max_new_tokens: 8\n")
    scored = CliRunner().invoke(
        app, ["eval", "--model", str(out), "--tasks", str(task_file), "--out", str(tmp_path / "e")]
    )
    assert scored.exit_code == 0, scored.output
    assert json.loads((tmp_path / "e" / "scores.json").read_text())["tasks"]["mixed"]["n"] == 4


# ------------------------------------------------------------------------------------- bad input


def test_bad_input_says_what_is_wrong_and_what_to_do(tmp_path, experts, make_checkpoint, make_lora):
    base, adapters, calibration = experts
    refs = [str(a) for a in adapters]

    def build(name: str, experts_: list[str] = refs, **kwargs):  # noqa: ANN202
        kwargs.setdefault("calibration", calibration)
        return build_routed(str(base), experts_, tmp_path / name, **kwargs)

    other_base = make_checkpoint("gpt2", seed=3)
    with pytest.raises(CheckpointError, match=r"trained for another base model.*--base"):
        build("x1", [refs[0], str(make_lora(other_base, seed=1, targets=("c_attn",)))])
    with pytest.raises(CheckpointError, match=r"fine-tuned from another base model"):
        build("x2", [refs[0], str(other_base)])
    short = write_rows(tmp_path / "short.csv", task_rows("a", 2, seed=1))
    with pytest.raises(TaskError, match=r"short.csv: 2 row\(s\), fewer than the 8 .*--calibration"):
        build("x3", calibration=[calibration[0], short])
    with pytest.raises(TaskError, match=r"no calibration rows.*--calibration FILE.csv"):
        build("x4", calibration=())
    with pytest.raises(CheckpointError, match=r"unknown router 'knn'; use one of arrow .*prompt"):
        build("x5", router="knn")
    with pytest.raises(CheckpointError, match=r"one rank.*--rank"):
        build(
            "x6",
            [refs[0], str(make_lora(base, seed=4, r=2, targets=("q_proj", "v_proj")))],
            router="arrow",
        )
    with pytest.raises(CheckpointError, match=r"--top-k 3: choose from 1 to 2"):
        build("x7", router="arrow", top_k=3)
    assert not any((tmp_path / f"x{k}").exists() for k in range(1, 8))

    build("ok")
    manifest = tmp_path / "ok" / "routed.json"
    document = json.loads(manifest.read_text())
    document["router"]["kind"] = "knn"
    manifest.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=r"routed.json: .*router: unknown router 'knn'"):
        LanguageModel.load(tmp_path / "ok")
    with pytest.raises(CheckpointError, match=r"drop --adapter"):
        LanguageModel.load(tmp_path / "ok", adapter=adapters[0])


# ---------------------------------------------------------------------------------------- the zoo


@pytest.mark.zoo
@pytest.mark.slow
def test_zoo_prompt_router_sends_validation_prompts_to_their_expert(tmp_path):
    from mergearena.checkpoints.refs import model_ref_exists
    from mergearena.zoo.prepare import task_files

    if not model_ref_exists("zoo:smollm2-135m"):
        pytest.skip("the zoo is not prepared: run `mergearena zoo prepare`")
    experts = ["zoo:sentiment-lora", "zoo:spam-lora"]
    build_routed("zoo:smollm2-135m", experts, tmp_path / "r", calibration_rows=4)
    lm = LanguageModel.load(tmp_path / "r", dtype="float32")
    for expert, name in enumerate(("sentiment", "spam")):
        rows = load_task(task_files("validation", [name])[0], limit=6).examples
        encoded = lm.tokenizer([e.input for e in rows], return_tensors="pt", padding=True)
        with torch.inference_mode():
            routed = lm.model.route(encoded["input_ids"], encoded["attention_mask"])
        assert routed.tolist() == [expert] * len(rows)
