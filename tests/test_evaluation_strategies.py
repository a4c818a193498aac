"""Inference strategies: lettered options, letter scoring, chain of thought, few-shot examples,
their sidecar keys and command-line options."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import TOKENIZER_VOCAB, _tiny_config
from typer.testing import CliRunner

from mergearena.cli import _spread_list_options, app
from mergearena.errors import EvaluationError, TaskError
from mergearena.evaluation import (
    CotSettings,
    Example,
    evaluate,
    load_task,
    write_outputs,
)
from mergearena.evaluation.runner import select_shots
from mergearena.evaluation.strategies import (
    COT_EXAMPLES,
    extract_answer,
    letter_texts,
    lettered_prompt,
)
from mergearena.models import LanguageModel

COLUMNS = ("id", "input", "target", "answer_choices", "eval_type")
MC_ROWS = [
    ("q1", "the water is on the long way\nAnswer:", "0", "['a way', 'the people', 'no']"),
    ("q2", "he was", "1", "['yes', 'no']"),
    ("q3", "they have made a long day\nAnswer:", "2", "['up', 'come get', 'find', 'down']"),
]
POOL_ROWS = [
    ("q1", "the water is on the long way", "1", "['a way', 'no']"),  # a scored row: skipped
    ("p1", "we can see", "1", "['up', 'down']"),
    ("p2", "what is it", "0", "['water', 'time']"),
]
VOCAB = TOKENIZER_VOCAB + list("ABCDEFGHIJ") + ["Options", "Answer", ":", ".", "(", ")"]


def write_task(path: Path, rows) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows([(*row, "multiple_choice") for row in rows])
    return path


def example(text: str, choices: tuple[str, ...], target: int = 0) -> Example:
    return Example("e1", text, "multiple_choice", choices, target)


def letter_lm(seed: int = 0) -> LanguageModel:
    """A tiny Llama whose word-level tokenizer knows the letters A-J, Options, Answer, ':'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaTokenizer

    backend = Tokenizer(
        models.WordLevel(vocab={t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = LlamaTokenizer(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
    )
    config = _tiny_config("llama")
    config.vocab_size = len(VOCAB)
    torch.manual_seed(seed)
    return LanguageModel(AutoModelForCausalLM.from_config(config), tokenizer)


def force_token(lm: LanguageModel, token: str) -> None:
    """Make ``token`` the most likely next token everywhere (greedy generation repeats it)."""
    token_id = lm.tokenizer.convert_tokens_to_ids(token)
    lm.model.lm_head.register_forward_hook(
        lambda _m, _i, out: out.index_fill(-1, torch.tensor([token_id]), 1e4)
    )


# ---------------------------------------------------------------------------------- prompts


def test_lettered_prompt_puts_options_before_the_answer_cue():
    text = "Review: fine.\nIs it positive or negative?\nAnswer:"
    assert lettered_prompt(text, example(text, (" negative", " positive"))) == (
        "Review: fine.\nIs it positive or negative?\nOptions:\nA. negative\nB. positive\nAnswer:"
    )
    assert lettered_prompt("What is it?", example("", ("up", "down"))) == (
        "What is it?\nOptions:\nA. up\nB. down\nAnswer:"
    )


def test_lettered_prompt_keeps_options_the_text_already_shows():
    cosmos = "Context.\nQuestion: Why?\nOptions:\nA. one .\nB. two .\nC. None of the above ."
    assert lettered_prompt(cosmos, example(cosmos, ("A", "B", "C"))) == cosmos + "\nAnswer:"
    bullets = "Context.\nQuestion: Why?\nOptions:\n- He left .\n - None of the above choices ."
    assert lettered_prompt(
        bullets, example(bullets, ("He left .", "None of the above choices ."))
    ) == (
        "Context.\nQuestion: Why?\nOptions:\nA. He left .\nB. None of the above choices .\nAnswer:"
    )
    mmlu = "Which?\nA. $9,000\nB. $10,000\n(C) 14000\nAnswer:"
    assert lettered_prompt(mmlu, example(mmlu, (" $9,000", " $10,000", " 14000"))) == mmlu
    with pytest.raises(EvaluationError, match="11 answer choices.*--mc-rule loglik"):
        lettered_prompt("x", example("x", tuple(str(k) for k in range(11))))


def test_letters_follow_the_cue_with_a_space_and_whitespace_without():
    assert letter_texts("Answer:", "AB") == [" A", " B"]
    assert letter_texts("<assistant>\n", "AB") == ["A", "B"]


# ---------------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B looks good, so the answer is (C). Answer: B", (2, "pattern")),
        ("Hence the answer is D", (3, "pattern")),
        ("the answer is (E), no wait. Answer: (B)", (1, "answer-colon")),  # E is not an option
        ("I think B fits, not A.", (0, "last-letter")),  # I is no option of four: skipped
        ("Both seem wrong to me.", (None, None)),
        ("", (None, None)),
    ],
)
def test_answer_extraction_pattern_then_answer_colon_then_last_letter(text, expected):
    assert extract_answer(text, 4, CotSettings()) == expected


def test_answer_extraction_pattern_and_fallbacks_are_configurable():
    strict = CotSettings(fallbacks=[])
    assert extract_answer("Answer: B", 4, strict) == (None, None)
    custom = CotSettings(pattern=r"\[\[([A-D])\]\]", fallbacks=["last-letter"])
    assert extract_answer("A or [[D]]", 4, custom) == (3, "pattern")
    assert extract_answer("A or B", 4, custom) == (1, "last-letter")
    assert CotSettings().pattern == r"answer is \(?([A-J])\)?"
    assert CotSettings().max_new_tokens == 512
    assert CotSettings().fallbacks == ["answer-colon", "last-letter"]


# ---------------------------------------------------------------------------------- letter


def test_letter_rule_equals_a_plain_unbatched_reference(tmp_path):
    lm = letter_lm(seed=2)
    task = load_task(write_task(tmp_path / "mc.csv", MC_ROWS))
    result = evaluate(lm, [task], mc_rule="letter", batch_size=2)[0]
    assert result.mc_rule == "letter"
    for r in result.examples:
        letters = "ABCD"[: len(r.example.choices)]
        assert r.prompt.endswith("\nAnswer:") and "\nOptions:\nA. " in r.prompt
        ids = lm.tokenizer(r.prompt).input_ids  # one prompt, no padding, no cache
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids])).logits[0, -1].float()
        letter_ids = [lm.tokenizer(" " + x, add_special_tokens=False).input_ids for x in letters]
        assert all(len(t) == 1 for t in letter_ids)
        letter_logits = logits[[t[0] for t in letter_ids]]
        expected = torch.log_softmax(logits, -1)[[t[0] for t in letter_ids]]
        assert r.scores == pytest.approx(expected.tolist(), abs=1e-4)
        assert r.prediction == int(letter_logits.argmax())  # the highest logit
        assert set(r.metrics) == {"accuracy"}


# ---------------------------------------------------------------------------------- cot


def test_cot_reads_the_letter_from_the_reasoning_and_logs_it(tmp_path):
    lm = letter_lm(seed=1)
    force_token(lm, "B")  # every reasoning is "B B B B": only the last-letter fallback finds it
    task = load_task(write_task(tmp_path / "mc.csv", MC_ROWS))
    result = evaluate(lm, [task], mc_rule="cot", cot={"max_new_tokens": 4}, batch_size=2)[0]
    assert [r.prediction for r in result.examples] == [1, 1, 1]
    assert {r.extracted_by for r in result.examples} == {"last-letter"}
    assert result.examples[1].metrics == {"accuracy": 1.0, "answered": 1.0}
    prompt = result.examples[0].prompt
    assert prompt.count("Let's think step by step.") == 4  # three worked examples + the question
    assert "So the answer is (B).\n\n" in prompt and prompt.endswith(
        "Answer: Let's think step by step."
    )
    write_outputs([result], tmp_path / "out")
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").open()]
    assert samples[0]["generation"].split() == ["B"] * 4
    assert samples[0]["extracted_by"] == "last-letter" and samples[0]["scores"] is None
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())["tasks"]["mc"]
    assert scores["mc_rule"] == "cot" and scores["fewshot"] == 3
    assert scores["cot"]["max_new_tokens"] == 4 and scores["metrics"]["answered"] == 1.0


def test_cot_without_a_letter_is_a_miss_counted_wrong(tmp_path):
    lm = letter_lm(seed=1)
    force_token(lm, "the")
    task = load_task(write_task(tmp_path / "mc.csv", MC_ROWS))
    result = evaluate(lm, [task], mc_rule="cot", cot={"max_new_tokens": 3}, fewshot=0)[0]
    assert [r.prediction for r in result.examples] == [-1, -1, -1]
    assert result.main_value == 0.0 and result.metrics["answered"] == 0.0
    assert "Let's think step by step." in result.examples[0].prompt
    assert result.fewshot == 0 and "So the answer is" not in result.examples[0].prompt
    write_outputs([result], tmp_path / "out")
    with (tmp_path / "out" / "predictions" / "mc.csv").open() as handle:
        assert [row["prediction"] for row in csv.DictReader(handle)] == ["-1", "-1", "-1"]


def test_cot_settings_from_evaluate_are_validated_naming_the_key(tmp_path):
    lm = letter_lm()
    task = load_task(write_task(tmp_path / "mc.csv", MC_ROWS))
    with pytest.raises(EvaluationError, match="task mc: cot.pattern: .*needs a group"):
        evaluate(lm, [task], mc_rule="cot", cot={"pattern": "answer is [A-J]"})
    with pytest.raises(EvaluationError, match="cot.fallbacks.0"):
        evaluate(lm, [task], mc_rule="cot", cot={"fallbacks": ["last_letter"]})


# ---------------------------------------------------------------------------------- few-shot


def test_fewshot_from_a_file_skips_the_scored_rows_and_answers_in_the_rule_format(tmp_path):
    task = load_task(write_task(tmp_path / "mc.csv", MC_ROWS))
    pool = write_task(tmp_path / "pool.csv", POOL_ROWS)
    cot = CotSettings()
    loglik = select_shots(task, "loglik", cot, count=2, source=pool)["multiple_choice"]
    assert [(s.prompt, s.answer) for s in loglik] == [
        ("we can see", "down"),
        ("what is it", "water"),
    ]
    letter = select_shots(task, "letter", cot, count=1, source=pool)["multiple_choice"]
    assert letter[0].prompt == "we can see\nOptions:\nA. up\nB. down\nAnswer:"
    assert letter[0].answer == " B"
    (tmp_path / "train").mkdir()
    write_task(tmp_path / "train" / "mc.csv", POOL_ROWS)
    chain = select_shots(task, "cot", cot, count=1, source=tmp_path / "train")  # <task>.csv
    assert chain["multiple_choice"][0].prompt.endswith("Answer: Let's think step by step.")
    assert chain["multiple_choice"][0].answer == " The answer is (B)."
    with pytest.raises(EvaluationError, match="has 0 multiple_choice row"):
        select_shots(task, "loglik", cot, count=1, source=tmp_path)  # mc.csv: every row scored
    with pytest.raises(EvaluationError, match="--fewshot 3, but .*pool.csv has 2"):
        select_shots(task, "loglik", cot, count=3, source=pool)
    with pytest.raises(EvaluationError, match="--fewshot-from needs --fewshot N"):
        select_shots(task, "loglik", cot, source=pool)


def test_fewshot_sources_sidecar_builtin_worked_examples_and_none(tmp_path):
    path = write_task(tmp_path / "mc.csv", MC_ROWS)
    plain = load_task(path)
    cot = CotSettings()
    assert select_shots(plain, "loglik", cot)["multiple_choice"] == []
    with pytest.raises(EvaluationError, match="no few-shot examples: give --fewshot-from"):
        select_shots(plain, "loglik", cot, count=2)
    worked = select_shots(plain, "cot", cot)["multiple_choice"]
    assert len(worked) == len(COT_EXAMPLES) == 3
    assert worked[0].answer.endswith("So the answer is (B).")
    assert len(select_shots(plain, "cot", cot, count=1)["multiple_choice"]) == 1
    (tmp_path / "mc.yaml").write_text("fewshot:\n  - {input: one, output: ' two'}\n")
    sidecar = load_task(path)
    assert [s.answer for s in select_shots(sidecar, "cot", cot)["multiple_choice"]] == [" two"]
    assert select_shots(sidecar, "loglik", cot, count=0)["multiple_choice"] == []
    with pytest.raises(EvaluationError, match="sidecar has 1 fewshot"):
        select_shots(sidecar, "loglik", cot, count=2)


# ---------------------------------------------------------------------------------- sidecars


def test_sidecar_sets_the_rule_and_cot_settings(tmp_path):
    path = write_task(tmp_path / "t.csv", MC_ROWS)
    (tmp_path / "t.yaml").write_text(
        "mc_rule: cot\ncot:\n  max_new_tokens: 7\n  pattern: 'ANSWER ([A-D])'\n"
        "  fallbacks: [last-letter]\n  stop: ['Question:']\n"
    )
    settings = load_task(path).settings
    assert settings.mc_rule == "cot" and settings.cot.max_new_tokens == 7
    assert settings.cot.fallbacks == ["last-letter"] and settings.cot.stop == ["Question:"]
    assert settings.cot.cue == CotSettings().cue


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mc_rule: logit\n", "mc_rule: Input should be 'loglik', 'starter-kit', 'letter' or 'cot'"),
        ("cot:\n  pattern: 'answer is [A-J]'\n", "cot.pattern: .*needs a group"),
        ("cot:\n  pattern: 'answer is ([A-J]'\n", "cot.pattern: .*not a regular expression"),
        ("cot:\n  fallbacks: [last_letter]\n", "cot.fallbacks.0: Input should be 'answer-colon'"),
        ("cot:\n  max_new_tokens: 0\n", "cot.max_new_tokens: Input should be greater"),
        ("cot:\n  stops: ['x']\n", "cot.stops: Extra inputs"),
        ("cot:\n  stop: ['']\n", "cot.stop: .*stop string is empty"),
    ],
)
def test_bad_strategy_sidecars_name_the_key(tmp_path, text, message):
    path = write_task(tmp_path / "t.csv", MC_ROWS)
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(TaskError, match=message) as error:
        load_task(path)
    assert str(tmp_path / "t.yaml") in str(error.value)


# ---------------------------------------------------------------------------------- commands


def test_eval_command_strategy_options(tmp_path, make_checkpoint):
    model = make_checkpoint("llama", seed=0)
    mc = write_task(tmp_path / "mc.csv", MC_ROWS)
    pool = write_task(tmp_path / "pool.csv", POOL_ROWS)
    out = tmp_path / "letter"
    args = ["eval", "--model", str(model), "--tasks", str(mc), "--out", str(out), "-q"]
    done = CliRunner().invoke(
        app, [*args, "--mc-rule", "letter", "--fewshot", "2", "--fewshot-from", str(pool)]
    )
    assert done.exit_code == 0, done.output
    entry = json.loads((out / "scores.json").read_text())["tasks"]["mc"]
    assert entry["mc_rule"] == "letter" and entry["fewshot"] == 2
    sample = json.loads((out / "samples.jsonl").open().readline())
    assert sample["input"].startswith("we can see\nOptions:\nA. up\nB. down\nAnswer: B\n\n")

    def fails(*extra: str) -> str:
        result = CliRunner().invoke(app, [*args[:-2], str(tmp_path / "x"), "-q", *extra])
        assert result.exit_code == 2 and not (tmp_path / "x").exists()
        return " ".join(result.output.split())

    assert "--cot-fallbacks: Input should be" in fails("--cot-fallbacks", "answer,last")
    assert "answer-colon, last-letter, or none" in fails("--cot-fallbacks", "answer")
    assert "--cot-pattern: Value error, needs a group" in fails("--cot-pattern", "answer [A-D]")
    assert "--cot-max-new-tokens: Input should be greater" in fails("--cot-max-new-tokens", "0")
    assert "--fewshot-from needs --fewshot N" in fails("--fewshot-from", str(pool))
    assert "--mc-rule 'logit'" in fails("--mc-rule", "logit")


def test_run_command_passes_the_strategy_through(tmp_path, make_checkpoint):
    base = make_checkpoint("llama", seed=0)
    tuned = make_checkpoint("llama", seed=1, base=base)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tuned}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
    )
    mc = write_task(tmp_path / "mc.csv", MC_ROWS)
    argv = ["run", str(recipe), "--tasks", str(mc), "--out", str(tmp_path / "run"), "-q"]
    result = CliRunner().invoke(
        app, _spread_list_options([*argv, "--mc-rule", "cot", "--cot-max-new-tokens", "2"])
    )
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "run" / "eval" / "scores.json").read_text())["tasks"]["mc"]
    assert entry["mc_rule"] == "cot" and entry["cot"]["max_new_tokens"] == 2
    bad = CliRunner().invoke(app, [*argv[:-2], str(tmp_path / "no"), "--cot-pattern", "("])
    assert bad.exit_code == 2 and "--cot-pattern" in bad.output
    assert not (tmp_path / "no").exists()  # refused before the merge


def test_starter_kit_warning_names_the_rows_once_per_task(tmp_path, make_checkpoint):
    """The zoo's checkpoints' tokenizer (PreTrainedTokenizerFast) appends no EOS for the kit."""
    lm = LanguageModel.load(make_checkpoint("llama", seed=0))
    rows = [
        ("m1", "he was", "1", "['yes', 'the people']"),
        ("m2", "what is it", "0", "['the water', 'a long day']"),
        ("m3", "we can see", "0", "['up', 'come get', 'no']"),
    ]
    task = load_task(write_task(tmp_path / "mix.csv", rows))
    with pytest.warns(UserWarning) as caught:
        result = evaluate(lm, [task], mc_rule="starter-kit")[0]
    kit = [w for w in caught if "starter-kit" in str(w.message)]
    assert len(kit) == 1 and "task mix" in str(kit[0].message)
    assert "'m1', 'm3'" in str(kit[0].message) and "'m2'" not in str(kit[0].message)
    assert result.empty_choice_rows == ["m1", "m3"]
    assert result.examples[0].scores[0] == 0.0
    assert result.summary()["empty_choice_rows"] == ["m1", "m3"]
    task = load_task(write_task(tmp_path / "yesno.csv", [("y1", "he was", "0", "['yes', 'no']")]))
    with pytest.raises(EvaluationError, match="task yesno: .*one token long in 1 row\\(s\\): 'y1'"):
        evaluate(lm, [task], mc_rule="starter-kit")
