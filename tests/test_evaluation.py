"""Task files, metrics, the evaluation runner, its output files and the `eval`/`run` commands."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import _read_weights
from typer.testing import CliRunner

from mergearena.checkpoints.lora import LoraAdapter
from mergearena.cli import _spread_list_options, app
from mergearena.errors import CheckpointError, TaskError
from mergearena.evaluation import evaluate, load_task, write_outputs
from mergearena.evaluation.metrics import exact_match, numeric_match, parse_number, rouge
from mergearena.models import LanguageModel

COLUMNS = ("id", "input", "target", "answer_choices", "eval_type")
MC_ROWS = [
    ("q1", "the water is on the long way", "0", "['a way', 'the people', 'no']", "multiple_choice"),
    ("q2", "he was", "1", "['yes', 'no']", "multiple_choice"),
    ("q3", "they have made a long day", "2", "['up', 'come get', 'find']", "multiple_choice"),
]
GEN_ROWS = [
    ("s1", "the people of the water", "the long way", "", "generation"),
    ("s2", "what is it", "one two", "", "generation"),
]


def write_task(path: Path, rows, columns=COLUMNS) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------ task files


def test_competition_files_load():
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "competition"
    if not data.is_dir():
        pytest.skip("../shared/data/competition is not beside the checkout")
    cosmos, xsum, test = (load_task(data / f) for f in ("cosmos_qa.csv", "xsum.csv", "test.csv"))
    assert (len(cosmos.examples), len(xsum.examples), len(test.examples)) == (500, 200, 807)
    assert cosmos.main_metric == "accuracy" and cosmos.has_targets
    assert cosmos.examples[0].choices == ("A", "B", "C", "D") and cosmos.examples[0].target == 1
    assert xsum.main_metric == "rougeL" and isinstance(xsum.examples[0].target, str)
    assert not test.has_targets
    assert {e.eval_type for e in test.examples} == {"multiple_choice", "generation"}


def test_task_reads_rows_and_limit(tmp_path):
    task = load_task(write_task(tmp_path / "mix.csv", MC_ROWS + GEN_ROWS), limit=4)
    assert task.name == "mix" and len(task.examples) == 4
    assert task.examples[1].choices == ("yes", "no") and task.examples[1].target == 1
    assert task.examples[3].target == "the long way"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (("q9", "x", "0", "['a', 'b'", "multiple_choice"), "row id 'q9'.*not a Python list"),
        (("q9", "x", "5", "['a', 'b']", "multiple_choice"), "row id 'q9'.*index 5 is out of range"),
        (("q9", "x", "b", "['a', 'b']", "multiple_choice"), "row id 'q9'.*not a choice index"),
        (("q9", "  ", "0", "['a', 'b']", "multiple_choice"), "row id 'q9'.*empty input"),
        (("q9", "x", "0", "['a']", "multiple_choice"), "row id 'q9'.*at least 2 choices"),
        (("q9", "x", "0", "['a', '']", "multiple_choice"), "row id 'q9'.*choice is empty"),
        (("q9", "x", "0", "['a', 'b']", "ranking"), "row id 'q9'.*eval_type 'ranking'"),
        (("q1", "x", "0", "['a', 'b']", "multiple_choice"), "row id 'q1'.*duplicate id"),
        (("q9", "x", "", "", "generation"), "row id 'q9'.*empty target"),
    ],
)
def test_malformed_rows_name_file_row_and_problem(tmp_path, row, message):
    path = write_task(tmp_path / "bad.csv", [*MC_ROWS, row])
    with pytest.raises(TaskError, match=message) as error:
        load_task(path)
    assert str(path) in str(error.value)


def test_missing_columns_and_missing_file(tmp_path):
    path = write_task(tmp_path / "cols.csv", [("1", "x")], columns=("id", "input"))
    with pytest.raises(TaskError, match="missing column.*eval_type"):
        load_task(path)
    with pytest.raises(TaskError, match="no such task file"):
        load_task(tmp_path / "nope.csv")


def test_sidecar_sets_metric_length_template_and_rule(tmp_path):
    path = write_task(tmp_path / "math.csv", GEN_ROWS)
    (tmp_path / "math.yaml").write_text(
        "metric: exact_match\nmax_new_tokens: 5\n"
        'template: "Q: {input}\\nA:"\nmc_rule: starter-kit\n'
    )
    task = load_task(path)
    assert task.main_metric == "exact_match"
    assert task.settings.max_new_tokens == 5 and task.settings.mc_rule == "starter-kit"
    assert task.render(task.examples[0]) == "Q: the people of the water\nA:"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("metrik: rougeL\n", "metrik: Extra inputs"),
        ("max_new_tokens: 0\n", "max_new_tokens"),
        ("template: 'no field'\n", "must contain the field"),
        ("- a\n", "mapping"),
    ],
)
def test_bad_sidecars_are_errors(tmp_path, text, message):
    path = write_task(tmp_path / "t.csv", GEN_ROWS)
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(TaskError, match=message):
        load_task(path)


def test_json_sidecar(tmp_path):
    path = write_task(tmp_path / "t.csv", GEN_ROWS)
    (tmp_path / "t.json").write_text(json.dumps({"metric": "numeric_match"}))
    assert load_task(path).main_metric == "numeric_match"


# ------------------------------------------------------------------------------------ metrics


def test_metrics():
    scores = rouge("the cat sat on the mat", "the cat sat on a mat")
    assert scores["rouge1"] == pytest.approx(5 / 6)
    assert rouge("cats running", "cat runs")["rouge1"] == 1.0  # stemmed
    assert exact_match("  Paris. ", "paris") == 1.0 and exact_match("Paris, France", "Paris") == 0.0
    assert parse_number("so the answer is 1,234.5 apples") == 1234.5
    assert parse_number("3/4") == 0.75 and parse_number("none") is None
    assert numeric_match("We get 42.", "42") == 1.0 and numeric_match("41", "42") == 0.0


# ------------------------------------------------------------------------------------ runner


def test_evaluate_and_write_outputs(tmp_path, make_checkpoint):
    model = make_checkpoint("llama", seed=0)
    lm = LanguageModel.load(model)
    mc = load_task(write_task(tmp_path / "mc.csv", MC_ROWS))
    gen = load_task(write_task(tmp_path / "gen.csv", GEN_ROWS))
    unscored = load_task(
        write_task(
            tmp_path / "test.csv",
            [(r[0], r[1], r[3], r[4]) for r in MC_ROWS + GEN_ROWS],
            columns=("id", "input", "answer_choices", "eval_type"),
        )
    )
    results = evaluate(lm, [mc, gen, unscored], batch_size=2)
    document = write_outputs(results, tmp_path / "out", model=str(model))
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores == json.loads(json.dumps(document))
    assert set(scores["tasks"]) == {"mc", "gen", "test"}
    mc_entry, gen_entry = scores["tasks"]["mc"], scores["tasks"]["gen"]
    assert mc_entry["main_metric"] == "accuracy" and mc_entry["n"] == 3
    correct = [r.prediction == r.example.target for r in results[0].examples]
    assert mc_entry["main"] == pytest.approx(sum(correct) / 3)
    assert {"accuracy", "accuracy_norm"} <= set(mc_entry["metrics"])
    assert gen_entry["main_metric"] == "rougeL" and "rougeLsum" in gen_entry["metrics"]
    assert scores["tasks"]["test"]["scored"] is False
    assert scores["average"] == pytest.approx((mc_entry["main"] + gen_entry["main"]) / 2)

    with (tmp_path / "out" / "predictions" / "mc.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == ["q1", "q2", "q3"]
    assert [int(r["prediction"]) for r in rows] == [r.prediction for r in results[0].examples]
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").open()]
    assert len(samples) == 3 + 2 + 5
    assert samples[0]["choices"] == ["a way", "the people", "no"]
    assert len(samples[0]["scores"]) == 3 and samples[0]["target"] == 0
    with (tmp_path / "out" / "submission.csv").open() as handle:
        submission = list(csv.DictReader(handle))
    assert list(submission[0]) == ["id", "prediction", "dummy_field"]
    assert [r["id"] for r in submission] == ["q1", "q2", "q3", "s1", "s2"]
    # The target-less copy of the same rows predicts the same choices and texts.
    predicted = {r.example.id: r.prediction_text for res in results[:2] for r in res.examples}
    assert {r["id"]: r["prediction"] for r in submission} == predicted

    with pytest.raises(CheckpointError, match="already exists"):
        write_outputs(results, tmp_path / "out")


def test_evaluation_is_independent_of_batch_size(tmp_path, make_checkpoint):
    lm = LanguageModel.load(make_checkpoint("gpt2", seed=4))
    tasks = [load_task(write_task(tmp_path / "mix.csv", MC_ROWS + GEN_ROWS))]
    one = evaluate(lm, tasks, batch_size=1)[0]
    auto = evaluate(lm, tasks, batch_size="auto")[0]
    assert [r.prediction for r in one.examples] == [r.prediction for r in auto.examples]
    for a, b in zip(one.examples[:3], auto.examples[:3], strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-5)


def test_auto_batch_size_halves_examples_and_tokens_until_the_work_fits():
    from types import SimpleNamespace

    from mergearena.evaluation import runner, scoring

    lm = SimpleNamespace(device=torch.device("cpu"))
    calls = []

    def run(size, budget):
        calls.append((size, budget))
        if size > 16:
            raise RuntimeError("DefaultCPUAllocator: out of memory")
        return "scored"

    examples, tokens = scoring.auto_limits(lm.device)
    assert runner._with_batch_size(lm, "auto", run, 1000) == ("scored", 16)
    assert calls[:2] == [(examples, tokens), (examples // 2, tokens // 2)]
    assert calls[-1] == (16, tokens * 16 // examples)
    # A number is that many examples a batch, with no token budget.
    assert runner._with_batch_size(lm, 3, lambda *limits: limits, 10) == ((3, None), 3)
    with pytest.raises(RuntimeError, match="device-side assert"):
        runner._with_batch_size(lm, "auto", _raise_device_assert, 10)


def _raise_device_assert(size, budget):
    raise RuntimeError("device-side assert triggered")


def test_chat_template_and_fewshot_prompts(tmp_path, make_checkpoint):
    lm = LanguageModel.load(make_checkpoint("llama", seed=0))
    path = write_task(tmp_path / "chat.csv", GEN_ROWS)
    (tmp_path / "chat.yaml").write_text(
        "chat_template: true\nfewshot:\n  - {input: 'one', output: 'two'}\n"
    )
    task = load_task(path)
    from mergearena.errors import EvaluationError

    with pytest.raises(EvaluationError, match="has none"):
        evaluate(lm, [task])
    lm.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    result = evaluate(lm, [task], batch_size=2)[0]
    assert result.examples[0].prompt == (
        "<user>one<assistant>two<user>the people of the water<assistant>"
    )
    plain = evaluate(lm, [task], chat_template=False)[0]
    assert plain.examples[0].prompt == "one" + "two\n\n" + "the people of the water"


def test_in_memory_state_dict_scores_like_the_checkpoint(tmp_path, make_checkpoint):
    base = make_checkpoint("llama", seed=0)
    tuned = make_checkpoint("llama", seed=1, base=base, noise=0.5)
    task = load_task(write_task(tmp_path / "mc.csv", MC_ROWS))
    from_disk = evaluate(LanguageModel.load(tuned), [task], batch_size=3)[0]
    in_memory = LanguageModel.from_state_dict(base, _read_weights(tuned))
    from_memory = evaluate(in_memory, [task], batch_size=3)[0]
    for a, b in zip(from_disk.examples, from_memory.examples, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-6)
    with pytest.raises(CheckpointError, match="does not fit"):
        LanguageModel.from_state_dict(base, {"nonsense.weight": torch.zeros(2)})


def test_adapter_through_peft_equals_our_lora_deltas(tmp_path, make_checkpoint, make_lora):
    base = make_checkpoint("llama", seed=0)
    adapter = make_lora(base, seed=2, targets=("q_proj", "v_proj", "down_proj"))
    task = load_task(write_task(tmp_path / "mc.csv", MC_ROWS))
    through_peft = evaluate(LanguageModel.load(base, adapter=adapter, dtype="float32"), [task])[0]
    weights = _read_weights(base)
    with LoraAdapter.open(adapter) as lora:
        for name in lora.target_weight_names():
            weights[name] = weights[name] + lora.delta(name, weights[name].shape).float()
    ours = evaluate(LanguageModel.from_state_dict(base, weights, dtype="float32"), [task])[0]
    plain = evaluate(LanguageModel.load(base, dtype="float32"), [task])[0]
    for a, b in zip(through_peft.examples, ours.examples, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-4)
    assert through_peft.examples[0].scores != pytest.approx(plain.examples[0].scores, abs=1e-3)


# ------------------------------------------------------------------------------------ commands


def test_spread_list_options():
    argv = ["eval", "--model", "m", "--tasks", "a.csv", "b.csv", "--out", "o"]
    assert _spread_list_options(argv) == [
        "eval",
        "--model",
        "m",
        "--tasks",
        "a.csv",
        "--tasks",
        "b.csv",
        "--out",
        "o",
    ]
    assert _spread_list_options(["eval", "--tasks", "--out", "o"]) == [
        "eval",
        "--tasks",
        "--out",
        "o",
    ]


def _text(result) -> str:
    return " ".join(result.output.split())  # rich wraps long lines


def test_eval_command(tmp_path, make_checkpoint):
    model = make_checkpoint("llama", seed=0)
    mc = write_task(tmp_path / "mc.csv", MC_ROWS)
    gen = write_task(tmp_path / "gen.csv", GEN_ROWS)
    out = tmp_path / "eval"
    args = ["eval", "--model", str(model), "--tasks", str(mc), str(gen), "--out", str(out)]
    result = CliRunner().invoke(app, _spread_list_options([*args, "--batch-size", "2", "-q"]))
    assert result.exit_code == 0, result.output
    assert "average" in result.output
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["tasks"]) == {"mc", "gen"}
    assert scores["dtype"] in ("float32", "bfloat16")  # auto: what this machine runs fast
    again = CliRunner().invoke(app, _spread_list_options(args))
    assert again.exit_code == 2 and "already exists" in _text(again)
    bad = write_task(tmp_path / "bad.csv", [("1", "x", "9", "['a', 'b']", "multiple_choice")])
    failed = CliRunner().invoke(
        app, ["eval", "--model", str(model), "--tasks", str(bad), "--out", str(tmp_path / "x")]
    )
    assert failed.exit_code == 2 and "out of range" in _text(failed)
    assert not (tmp_path / "x").exists()
    rule = CliRunner().invoke(
        app, _spread_list_options([*args[:-1], str(tmp_path / "y"), "--mc-rule", "acc"])
    )
    assert rule.exit_code == 2 and "--mc-rule 'acc'" in _text(rule)


def test_run_command_merges_then_evaluates(tmp_path, make_checkpoint):
    base = make_checkpoint("llama", seed=0)
    tuned = make_checkpoint("llama", seed=1, base=base)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tuned}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
    )
    mc = write_task(tmp_path / "mc.csv", MC_ROWS)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["run", str(recipe), "--tasks", str(mc), "--out", str(out), "-q"]
    )
    assert result.exit_code == 0, result.output
    assert "leaderboard row" in _text(result) and "mc=" in _text(result)
    assert (out / "model" / "config.json").is_file()
    scores = json.loads((out / "eval" / "scores.json").read_text())
    direct = evaluate(LanguageModel.load(out / "model"), [load_task(mc)])[0]
    assert scores["tasks"]["mc"]["main"] == direct.main_value
