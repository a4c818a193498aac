"""The batched, cached scorers against plain references: one example and one choice at a time,
no KV cache, no padding. Llama and GPT-2 models; Llama-style (BOS, EOS-appending) and GPT-2-style
(no special tokens) tokenizers; a T5 model for the seq2seq path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TOKENIZER_VOCAB, _tiny_config

from mergearena.errors import EvaluationError
from mergearena.evaluation import (
    LanguageModel,
    encode_choices,
    encode_prompts,
    generate,
    score_choices,
)

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


def starter_kit_transcription(lm: LanguageModel, prompt: str, choices: list[str]):
    """The starter kit's decoder `predict_multiple_choice` at batch size 1, as it ships."""
    input_tokenizer = copy.deepcopy(lm.tokenizer)
    target_tokenizer = copy.deepcopy(lm.tokenizer)
    input_tokenizer.padding_side = "left"
    target_tokenizer.padding_side = "right"
    target_tokenizer.add_bos_token = False
    target_tokenizer.add_eos_token = True
    inputs = input_tokenizer([prompt], return_tensors="pt", padding="longest")
    targets = target_tokenizer(choices, return_tensors="pt", padding="longest")
    with torch.no_grad():
        out = lm.model(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, use_cache=True
        )
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(choices))
        mask = torch.cat(
            [inputs.attention_mask.repeat_interleave(len(choices), 0), targets.attention_mask], 1
        )
        logits = lm.model(
            input_ids=targets.input_ids, attention_mask=mask, past_key_values=cache, use_cache=True
        ).logits.float()
    shifted = logits[:, :-1, :]
    ids, id_mask = targets.input_ids[:, 1:], targets.attention_mask[:, 1:]
    logprobs = -F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), ids.reshape(-1), reduction="none"
    ).reshape(ids.shape)
    scores = (logprobs * id_mask).sum(-1)
    return int(scores.argmax()), scores.tolist()


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


def test_starter_kit_rule_refuses_one_token_choices_without_eos():
    lm = tiny_lm("gpt2", "gpt2")
    with pytest.raises(EvaluationError, match="one token long.*--mc-rule loglik"):
        encode_choices(lm, CHOICES, "starter-kit", ids=[str(i) for i in range(len(CHOICES))])


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


@pytest.mark.parametrize("support", [(True, False), (False, False)])
def test_models_without_logits_to_keep_masks_score_the_same(monkeypatch, support):
    """Older transformers take no boolean logits_to_keep (or none at all): full logits then."""
    from mergearena.evaluation import scoring

    lm = tiny_lm("llama", "llama", seed=7)
    expected = _batched(lm, "loglik", batch_size=3)
    monkeypatch.setattr(scoring, "_logits_to_keep_support", lambda _cls: support)
    for result, reference in zip(_batched(lm, "loglik", batch_size=3), expected, strict=True):
        assert result.scores == pytest.approx(reference.scores, abs=1e-5)


def test_allocator_tuning_can_be_turned_off(monkeypatch):
    from mergearena.evaluation.scoring import tune_cpu_allocator

    monkeypatch.setenv("MERGEARENA_NO_MALLOC_TUNING", "1")
    assert tune_cpu_allocator.__wrapped__() is False
