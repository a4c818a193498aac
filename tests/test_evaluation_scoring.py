"""The batched, cached scorers against plain references: one example and one choice at a time,
no KV cache, no padding. Llama and GPT-2 models; Llama-style (BOS, EOS-appending) and GPT-2-style
(no special tokens) tokenizers; a T5 model for the seq2seq path."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import TOKENIZER_VOCAB, _tiny_config

from mergearena.errors import EvaluationError
from mergearena.evaluation import (
    StarterKitWarning,
    encode_choices,
    encode_prompts,
    generate,
    score_choices,
)
from mergearena.models import LanguageModel

PROMPTS = [
    "the water is on the long way",
    "he was",
    "they have made a long day of it and then some more time",
    "what",
    "we can see the people",
]
CHOICES = [
    ["a way", "the people of my", "no"],
    ["yes", "no"],
    ["up down", "come get made", "find", "two more water"],
    ["it", "them that"],
    ["now", "then two", "first of all"],
]


def _backend(post_processor=None):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(TOKENIZER_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if post_processor is not None:
        backend.post_processor = post_processor
    return backend


def llama_style_tokenizer():
    """A LlamaTokenizer: adds BOS; the starter kit's copy of it appends EOS."""
    from transformers import LlamaTokenizer

    return LlamaTokenizer(
        tokenizer_object=_backend(),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
    )


def gpt2_style_tokenizer():
    """A GPT2Tokenizer: no BOS, no pad token; the starter kit's copy appended nothing."""
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer(
        tokenizer_object=_backend(), unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_lm(kind: str, tokenizer_style: str, seed: int = 0) -> LanguageModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(kind))
    tokenizer = llama_style_tokenizer() if tokenizer_style == "llama" else gpt2_style_tokenizer()
    return LanguageModel(model, tokenizer)


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def reference_scores(lm: LanguageModel, prompt: str, choices: list[str], rule: str) -> list[float]:
    """One choice at a time over the whole sequence, no cache, no padding."""
    tokenizer = lm.tokenizer
    prompt_ids = tokenizer(prompt).input_ids
    scores = []
    for choice in choices:
        choice_ids = tokenizer(choice, add_special_tokens=False).input_ids
        if rule == "starter-kit" and type(tokenizer).__name__ == "LlamaTokenizer":
            choice_ids = choice_ids + [tokenizer.eos_token_id]
        logprobs = _logprobs(lm.model, prompt_ids + choice_ids)
        first = 0 if rule == "loglik" else 1  # the starter kit never scores the first token
        scores.append(
            sum(
                float(logprobs[len(prompt_ids) + t - 1, choice_ids[t]])
                for t in range(first, len(choice_ids))
            )
        )
    return scores


def kit_tokenizers(lm: LanguageModel):
    """The kit's (input, target) tokenizer pair as the competition's transformers made it.

    The kit sets ``add_eos_token = True`` on the target copy. In transformers 4.40-4.44 only
    Llama-family tokenizers honoured it; GPT-2-style ones (SmolLM2's too) appended nothing.
    transformers 5 honours it everywhere, so for those it is left off here, as it acted then.
    """
    input_tokenizer = copy.deepcopy(lm.tokenizer)
    target_tokenizer = copy.deepcopy(lm.tokenizer)
    for tokenizer in (input_tokenizer, target_tokenizer):
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = tokenizer.eos_token_id
    input_tokenizer.padding_side = "left"
    target_tokenizer.padding_side = "right"
    target_tokenizer.add_bos_token = False
    if type(lm.tokenizer).__name__.removesuffix("Fast") in ("LlamaTokenizer", "GemmaTokenizer"):
        target_tokenizer.add_eos_token = True
    return input_tokenizer, target_tokenizer


def kit_predict_multiple_choice(lm: LanguageModel, prompts: list[str], choices: list[list[str]]):
    """The starter kit's decoder ``predict_multiple_choice`` (llm_merging/model/
    decoder_functions.py), line for line, on one batch of examples. The kit's own evaluation
    loop calls it with one example per batch. The prompt cache is repeated with the Cache
    object's ``batch_repeat_interleave`` where the kit repeats legacy tuples (same tensors).
    Returns (predicted choice per example, scores per example); raises where the kit raises."""
    input_tokenizer, target_tokenizer = kit_tokenizers(lm)
    inputs = input_tokenizer(
        prompts, return_tensors="pt", padding="longest", truncation="longest_first"
    )
    flat = [choice for group in choices for choice in group]
    targets = target_tokenizer(
        flat, return_tensors="pt", padding="longest", truncation="longest_first"
    )
    with torch.no_grad():
        output = lm.model(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, use_cache=True
        )
        num_answer_choices = targets.input_ids.shape[0] // inputs.attention_mask.shape[0]
        expanded_input_mask = torch.repeat_interleave(
            inputs.attention_mask, num_answer_choices, dim=0
        )
        cache = output.past_key_values
        cache.batch_repeat_interleave(num_answer_choices)
        combined_mask = torch.cat([expanded_input_mask, targets.attention_mask], dim=1)
        logits = lm.model(
            input_ids=targets.input_ids,
            attention_mask=combined_mask,
            past_key_values=cache,
            use_cache=True,
        ).logits.float()
    vocab_size = logits.shape[-1]
    shifted_logits = logits[..., :-1, :].contiguous()
    shifted_ids = targets.input_ids[..., 1:].contiguous()
    shifted_masks = targets.attention_mask[..., 1:].contiguous()
    max_len = shifted_logits.shape[1]
    log_probs = -F.cross_entropy(
        shifted_logits.view(-1, vocab_size), shifted_ids.view(-1), reduction="none"
    )
    log_probs = log_probs.reshape(-1, num_answer_choices, max_len)  # fails when max_len is 0
    masks = shifted_masks.reshape(-1, num_answer_choices, max_len)
    scores = torch.sum(log_probs * masks, dim=2)
    _, predicted_choice = torch.max(scores, dim=1)
    return predicted_choice.tolist(), scores.tolist()


def starter_kit_transcription(lm: LanguageModel, prompt: str, choices: list[str]):
    """The kit's prediction and scores for one example, as its evaluation loop asks."""
    predictions, scores = kit_predict_multiple_choice(lm, [prompt], [choices])
    return predictions[0], scores[0]


def _batched(lm: LanguageModel, rule: str, batch_size: int):
    prompts = encode_prompts(lm, PROMPTS)
    choices = encode_choices(lm, CHOICES, rule)
    return score_choices(lm, prompts, choices, rule=rule, batch_size=batch_size)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("style", ["llama", "gpt2"])
@pytest.mark.parametrize("rule", ["loglik", "starter-kit"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_scores_equal_plain_reference(kind, style, rule, batch_size):
    lm = tiny_lm(kind, style)
    if rule == "starter-kit" and style == "gpt2":
        choices = [[c + " the" for c in group] for group in CHOICES]  # no one-token choices
    else:
        choices = CHOICES
    prompts = encode_prompts(lm, PROMPTS)
    results = score_choices(
        lm, prompts, encode_choices(lm, choices, rule), rule=rule, batch_size=batch_size
    )
    for prompt, group, result in zip(PROMPTS, choices, results, strict=True):
        expected = reference_scores(lm, prompt, group, rule)
        assert result.scores == pytest.approx(expected, abs=1e-4)
        assert result.prediction == expected.index(max(expected))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_starter_kit_rule_matches_the_starter_kit_code_on_llama_tokenizers(kind):
    lm = tiny_lm(kind, "llama", seed=3)
    results = _batched(lm, "starter-kit", batch_size=4)
    for prompt, group, result in zip(PROMPTS, CHOICES, results, strict=True):
        prediction, scores = starter_kit_transcription(lm, prompt, group)
        assert result.prediction == prediction
        assert result.scores == pytest.approx(scores, abs=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("shared", [True, False])
def test_choice_runs_read_one_prompt_cache_without_copies(monkeypatch, kind, shared):
    """Each run of choices reads the prompt cache through a view that stores nothing, so no
    run copies it; where the layers are not plain DynamicLayers, each run takes a copy."""
    from mergearena.evaluation import scoring

    lm = tiny_lm(kind, "llama", seed=8)
    expected = [
        reference_scores(lm, prompt, group, "loglik")
        for prompt, group in zip(PROMPTS, CHOICES, strict=True)
    ]
    made, copied = [], []
    share, deepcopy = scoring._shared_prompt_cache, copy.deepcopy

    def spy_share(prompt_cache, owner):
        made.append(share(prompt_cache, owner) if shared else None)
        return made[-1]

    monkeypatch.setattr(scoring, "_shared_prompt_cache", spy_share)
    spy_copy = SimpleNamespace(copy=copy.copy, deepcopy=lambda x: copied.append(x) or deepcopy(x))
    monkeypatch.setattr(scoring, "copy", spy_copy)
    monkeypatch.setitem(scoring.PASS_OVERHEAD, "cpu", 0)  # one run per choice length
    results = _batched(lm, "loglik", batch_size=5)
    for result, reference in zip(results, expected, strict=True):
        assert result.scores == pytest.approx(reference, abs=1e-4)
    assert len(made) > 2
    if shared:
        assert all(cache is not None for cache in made) and not copied
    else:
        assert len(copied) == len(made) - 1  # the last run takes the prompt cache itself


def _padded_cost(lengths, runs, overhead):
    return sum(len(run) * lengths[run.start] + overhead for run in runs)


def _least_cost(lengths, overhead):
    """Every cut of ``lengths`` into runs, the cheapest (no limits)."""
    best = [0] * (len(lengths) + 1)
    for start in range(len(lengths) - 1, -1, -1):
        best[start] = min(
            (end - start) * lengths[start] + overhead + best[end]
            for end in range(start + 1, len(lengths) + 1)
        )
    return best[0]


def test_chunk_rows_cuts_at_least_cost_and_keeps_to_its_limits():
    import random

    from mergearena.evaluation.scoring import chunk_rows

    rng = random.Random(0)
    for _ in range(500):
        lengths = sorted((rng.randint(1, 9) for _ in range(rng.randint(1, 14))), reverse=True)
        overhead = rng.randint(0, 12)
        runs = chunk_rows(lengths, budget=10**9, overhead=overhead)
        assert [k for run in runs for k in run] == list(range(len(lengths)))
        assert _padded_cost(lengths, runs, overhead) == _least_cost(lengths, overhead)
        budget, max_rows = rng.randint(1, 40), rng.randint(1, 6)
        runs = chunk_rows(lengths, budget=budget, overhead=overhead, max_rows=max_rows)
        assert [k for run in runs for k in run] == list(range(len(lengths)))
        for run in runs:  # a row longer than the budget runs alone
            assert len(run) == 1 or len(run) * lengths[run.start] <= budget
            assert len(run) <= max_rows
    assert chunk_rows([5, 5, 5, 5], budget=100, overhead=0) == [range(0, 4)]
    assert chunk_rows([9, 2, 2, 2], budget=100, overhead=0) == [range(0, 1), range(1, 4)]
    assert chunk_rows([9, 2, 2, 2], budget=100, overhead=30) == [range(0, 4)]
    assert chunk_rows([], budget=100, overhead=0) == []


def test_plan_batches_by_examples_or_by_tokens():
    from mergearena.evaluation.scoring import plan_batches

    lengths = [3, 40, 5, 5, 38, 4]
    order = sorted(range(6), key=lambda k: -lengths[k])  # 1, 4, 2, 3, 5, 0
    assert plan_batches(order, lengths, batch_size=4, token_budget=None) == [[1, 4, 2, 3], [5, 0]]
    # 80 tokens: the long two together, the short four together (padding 1+2 tokens < a pass).
    planned = plan_batches(order, lengths, batch_size=8, token_budget=80, overhead=8)
    assert planned == [[1, 4], [2, 3, 5, 0]]
    assert plan_batches(order, lengths, batch_size=8, token_budget=30, overhead=8) == [
        [1],
        [4],
        [2, 3, 5, 0],
    ]


@pytest.mark.parametrize("rule", ["loglik", "starter-kit"])
def test_token_budgets_do_not_change_scores(rule):
    lm = tiny_lm("llama", "llama", seed=9)
    prompts, choices = encode_prompts(lm, PROMPTS), encode_choices(lm, CHOICES, rule)
    expected = score_choices(lm, prompts, choices, rule=rule, batch_size=1)
    for budget in (1, 12, 40, 10**6):
        results = score_choices(lm, prompts, choices, rule=rule, batch_size=8, token_budget=budget)
        for result, reference in zip(results, expected, strict=True):
            assert result.scores == pytest.approx(reference.scores, abs=1e-5)
            assert result.scored_tokens == reference.scored_tokens
    texts = generate(lm, prompts, max_new_tokens=5, batch_size=1)
    for budget in (1, 30, 10**6):
        assert generate(lm, prompts, max_new_tokens=5, batch_size=8, token_budget=budget) == texts
    with pytest.raises(EvaluationError, match="token budget must be at least 1"):
        score_choices(lm, prompts, choices, rule=rule, token_budget=0)


def test_starter_kit_rule_skips_the_first_choice_token():
    lm = tiny_lm("llama", "llama")
    loglik = _batched(lm, "loglik", 8)
    starter = _batched(lm, "starter-kit", 8)
    # A one-word choice under Llama-style tokenizers scores only P(</s> | prompt, word).
    ids = encode_prompts(lm, [PROMPTS[1]])[0]
    word = lm.tokenizer("yes", add_special_tokens=False).input_ids
    expected = float(_logprobs(lm.model, ids + word)[-1, lm.tokenizer.eos_token_id])
    assert starter[1].scores[0] == pytest.approx(expected, abs=1e-5)
    assert starter[1].scored_tokens == (1, 1)
    assert loglik[1].scored_tokens == (1, 1)
    assert loglik[0].scored_tokens == (2, 4, 1)
    assert starter[0].scored_tokens == (2, 4, 1)  # tokens 2..n of choice + </s>


# One-token and longer choices mixed, with a GPT-2-style tokenizer (no EOS): row "r1" ties two
# one-token choices at 0.0, row "r2" has none, row "r5" puts its one-token choice first.
MIXED_CHOICES = [
    ["a way", "the people of my", "no"],
    ["yes", "the long way", "no"],
    ["up down", "come get made", "two more water"],
    ["it", "them that"],
    ["now", "then two", "first of all"],
]
MIXED_IDS = ["r0", "r1", "r2", "r3", "r4"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_starter_kit_rule_equals_the_kit_with_one_token_choices_and_no_eos(kind, batch_size):
    lm = tiny_lm(kind, "gpt2", seed=3)
    assert not lm.starter_kit_appends_eos
    with pytest.warns(StarterKitWarning) as caught:
        choices = encode_choices(lm, MIXED_CHOICES, "starter-kit", MIXED_IDS, task="mixed")
    results = score_choices(
        lm, encode_prompts(lm, PROMPTS), choices, rule="starter-kit", batch_size=batch_size
    )
    for prompt, group, result in zip(PROMPTS, MIXED_CHOICES, results, strict=True):
        prediction, scores = starter_kit_transcription(lm, prompt, group)
        assert result.scores == pytest.approx(scores, abs=1e-4)
        assert result.prediction == prediction
        for choice, score, counted in zip(group, result.scores, result.scored_tokens, strict=True):
            if len(lm.tokenizer(choice, add_special_tokens=False).input_ids) == 1:
                assert score == 0.0 and counted == 0  # the empty sum, exactly
    # Two choices at 0.0: the first wins, as torch.max picks in the kit.
    assert results[1].scores[0] == results[1].scores[2] == 0.0
    assert results[1].prediction == starter_kit_transcription(lm, PROMPTS[1], MIXED_CHOICES[1])[0]
    assert results[1].prediction == 0
    assert len(caught) == 1  # once for the whole call, naming every row with a 0.0 choice
    message = str(caught[0].message)
    assert "task mixed" in message and "'r0', 'r1', 'r3', 'r4'" in message
    assert "'r2'" not in message


def test_starter_kit_rule_refuses_only_where_the_kit_fails():
    lm = tiny_lm("gpt2", "gpt2", seed=4)
    prompts, choices = PROMPTS[:2], [["yes", "no"], ["a way", "no"]]
    # Every choice of the kit's batch (one example in its evaluation loop) is one token long:
    # nothing is left to score, and the kit's reshape of the empty scores fails.
    with pytest.raises(RuntimeError, match="cannot reshape tensor of 0 elements"):
        kit_predict_multiple_choice(lm, prompts[:1], choices[:1])
    with pytest.raises(EvaluationError) as refused:
        encode_choices(lm, choices, "starter-kit", ["q1", "q2"], task="yesno")
    message = str(refused.value)
    assert "task yesno" in message and "one token long in 1 row(s): 'q1'." in message
    assert "kit itself fails" in message and "--mc-rule loglik" in message and "'q2'" not in message
    # Called on both rows at once, the kit has "a way" to score, so it runs; so do we when told
    # that the kit's batch held both, and we predict what it predicts.
    kit_predictions, kit_scores = kit_predict_multiple_choice(lm, prompts, choices)
    with pytest.warns(StarterKitWarning, match="'q1', 'q2'"):
        encoded = encode_choices(lm, choices, "starter-kit", ["q1", "q2"], kit_batch_size=2)
    results = score_choices(lm, encode_prompts(lm, prompts), encoded, rule="starter-kit")
    assert [r.prediction for r in results] == kit_predictions == [0, 1]
    assert results[0].scores == (0.0, 0.0) and kit_scores[0] == [0.0, 0.0]


def test_starter_kit_rule_with_eos_appending_tokenizers_neither_warns_nor_refuses():
    lm = tiny_lm("llama", "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoded = encode_choices(lm, [["yes", "no"]], "starter-kit")
    eos = lm.tokenizer.eos_token_id
    assert [len(t) for t in encoded[0]] == [2, 2] and {t[-1] for t in encoded[0]} == {eos}


def test_prompt_lengths_and_padding_do_not_change_scores():
    lm = tiny_lm("llama", "llama", seed=5)
    alone = [_batched(lm, "loglik", 1)[k].scores for k in range(len(PROMPTS))]
    together = [r.scores for r in _batched(lm, "loglik", len(PROMPTS))]
    for a, b in zip(alone, together, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_unknown_rule_is_an_error():
    lm = tiny_lm("llama", "llama")
    with pytest.raises(EvaluationError, match="not one of loglik, starter-kit"):
        encode_choices(lm, CHOICES, "acc")


# Zoo MMLU rows whose choices mix one-token and longer ones under SmolLM2's tokenizer, which
# appends no EOS; row 0024 has two one-token choices, tied at 0.0.
ZOO_MIXED_ROWS = ("0001", "0024", "0025", "0051", "0056")


@pytest.mark.zoo
def test_starter_kit_rule_equals_the_kit_on_smollm2():
    from mergearena.checkpoints.refs import zoo_model_dir
    from mergearena.evaluation import load_task
    from mergearena.zoo.base import BASE_NAME, check_manifest
    from mergearena.zoo.tasks import tasks_dir

    problem = check_manifest(zoo_model_dir(BASE_NAME))
    task_file = tasks_dir() / "validation" / "mmlu.csv"
    if problem is not None or not task_file.is_file():
        pytest.skip(f"the zoo is not prepared ({problem or 'no task files'}); run zoo prepare")
    lm = LanguageModel.load(f"zoo:{BASE_NAME}", dtype="float32")  # exact comparison
    wanted = {f"mmlu-validation-{number}" for number in ZOO_MIXED_ROWS}
    rows = [e for e in load_task(task_file, limit=60).examples if e.id in wanted]
    assert len(rows) == len(ZOO_MIXED_ROWS)
    with pytest.warns(StarterKitWarning, match="5 row"):
        choices = encode_choices(lm, [e.choices for e in rows], "starter-kit", [e.id for e in rows])
    prompts = encode_prompts(lm, [e.input for e in rows])
    results = score_choices(lm, prompts, choices, rule="starter-kit", batch_size=5)
    for example, result in zip(rows, results, strict=True):
        prediction, scores = starter_kit_transcription(lm, example.input, list(example.choices))
        assert result.prediction == prediction, example.id
        assert result.scores == pytest.approx(scores, abs=1e-3)
        assert 0.0 in result.scores
    tied = results[1]
    assert tied.scores[2] == tied.scores[3] == 0.0 and tied.prediction == 2


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_generation_equals_unbatched_unpadded_generation(kind):
    lm = tiny_lm(kind, "llama", seed=1)
    prompts = encode_prompts(lm, PROMPTS)
    batched = generate(lm, prompts, max_new_tokens=6, batch_size=4)
    expected = []
    for ids in prompts:  # the starter kit's `generate` at batch size 1
        with torch.no_grad():
            output = lm.model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=lm.tokenizer.eos_token_id,
                pad_token_id=lm.tokenizer.pad_token_id,
            )
        expected.append(lm.tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True))
    assert batched == expected
    assert any(text for text in batched)


def test_generation_stops_at_a_stop_string_and_cuts_it_off():
    lm = tiny_lm("llama", "llama", seed=1)
    prompts = encode_prompts(lm, PROMPTS)
    free = generate(lm, prompts, max_new_tokens=8, batch_size=5)
    stop = free[0].split()[2]  # a word the first row generates, after two others
    stopped = generate(lm, prompts, max_new_tokens=8, batch_size=2, stop=[stop, "never seen"])
    assert stopped == [text[: text.index(stop)] if stop in text else text for text in free]
    assert stopped[0] and stop not in stopped[0]
    alone = [generate(lm, [p], max_new_tokens=8, batch_size=1, stop=[stop])[0] for p in prompts]
    assert alone == stopped
    with pytest.raises(EvaluationError, match="stop string is empty"):
        generate(lm, prompts, stop=[""])


def test_generation_stops_at_eos():
    lm = tiny_lm("llama", "llama", seed=2)
    eos = lm.tokenizer.eos_token_id
    lm.model.lm_head.register_forward_hook(  # EOS becomes the most likely token everywhere
        lambda _m, _i, out: out.index_fill(-1, torch.tensor([eos]), 1e4)
    )
    texts = generate(lm, encode_prompts(lm, PROMPTS[:2]), max_new_tokens=10, batch_size=2)
    assert texts == ["", ""]


# ---------------------------------------------------------------------------------------- seq2seq


def tiny_t5() -> LanguageModel:
    from tokenizers import processors
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(TOKENIZER_VOCAB),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        pad_token_id=3,
        eos_token_id=2,
        decoder_start_token_id=3,
    )
    post = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    tokenizer = T5Tokenizer(
        tokenizer_object=_backend(post), unk_token="<unk>", eos_token="</s>", pad_token="<pad>"
    )
    return LanguageModel(T5ForConditionalGeneration(config), tokenizer)


def test_seq2seq_scores_whole_choice_as_labels_under_both_rules():
    lm = tiny_t5()
    for rule in ("loglik", "starter-kit"):
        results = _batched(lm, rule, batch_size=3)
        for prompt, group, result in zip(PROMPTS, CHOICES, results, strict=True):
            inputs = lm.tokenizer(prompt, return_tensors="pt")
            expected = []
            for choice in group:
                labels = lm.tokenizer(choice, return_tensors="pt").input_ids  # ends with </s>
                with torch.no_grad():
                    logits = lm.model(**inputs, labels=labels).logits[0]
                logprobs = torch.log_softmax(logits, -1)
                expected.append(float(logprobs.gather(-1, labels[0][:, None]).sum()))
            assert result.scores == pytest.approx(expected, abs=1e-4)


def test_seq2seq_generation_batched_equals_single():
    lm = tiny_t5()
    prompts = encode_prompts(lm, PROMPTS)
    assert generate(lm, prompts, max_new_tokens=5, batch_size=5) == generate(
        lm, prompts, max_new_tokens=5, batch_size=1
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rule", ["loglik", "starter-kit"])
def test_cuda_scores_equal_cpu_scores(rule):
    cpu = tiny_lm("llama", "llama", seed=6)
    cuda = LanguageModel(copy.deepcopy(cpu.model).to("cuda"), cpu.tokenizer)
    expected = _batched(cpu, rule, batch_size=3)
    for result, reference in zip(_batched(cuda, rule, batch_size=3), expected, strict=True):
        assert result.scores == pytest.approx(reference.scores, abs=1e-3)
        assert result.prediction == reference.prediction
    prompts = encode_prompts(cpu, PROMPTS)
    assert generate(cuda, prompts, max_new_tokens=5, batch_size=5) == generate(
        cpu, prompts, max_new_tokens=5, batch_size=5
    )


def test_models_without_logits_to_keep_score_the_same(monkeypatch):
    """A forward that takes no logits_to_keep computes the prompt's logits everywhere."""
    from mergearena.evaluation import scoring

    lm = tiny_lm("llama", "llama", seed=7)
    expected = _batched(lm, "loglik", batch_size=3)
    monkeypatch.setattr(scoring, "_takes_logits_to_keep", lambda _cls: False)
    for result, reference in zip(_batched(lm, "loglik", batch_size=3), expected, strict=True):
        assert result.scores == pytest.approx(reference.scores, abs=1e-5)


def test_allocator_tuning_can_be_turned_off(monkeypatch):
    from mergearena.malloc import tune_cpu_allocator

    monkeypatch.setenv("MERGEARENA_NO_MALLOC_TUNING", "1")
    assert tune_cpu_allocator.__wrapped__() is False
