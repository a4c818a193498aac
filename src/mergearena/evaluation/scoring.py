"""Batched multiple-choice scoring and greedy generation.

Multiple choice, decoder models: the prompts of a batch are encoded once (left padding, explicit
positions so padding changes nothing) and their KV cache is shared by every choice of the example.
The prompt pass computes the LM head on the last position only; the choice pass feeds each choice
without its last token (whose logits no rule needs) and computes the LM head on real tokens only.

Two rules decide which tokens count (see ``MC_RULES``):

- ``loglik``: every token of the choice, tokenized on its own without special tokens, given the
  prompt: log P(c0 | prompt) + log P(c1 | prompt, c0) + ...
- ``starter-kit``: the competition starter kit's rule. The choice is tokenized by a copy of the
  tokenizer with BOS off and EOS on (Llama-style tokenizers append EOS, GPT-2-style ones append
  nothing) and its tokens 2..n are scored: the first choice token is never scored. A one-token
  choice without EOS scores 0.0, and rows where the kit itself fails are refused (see
  ``encode_choices``).

The rules ``letter`` and ``cot`` (evaluation/strategies.py) ask differently and use this module's
two primitives: ``letter`` scores one-token letter choices under ``loglik``, ``cot`` generates.

Seq2seq models score the whole choice (as the tokenizer encodes it) as decoder labels, under both
rules, as the starter kit does.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mergearena.errors import EvaluationError
from mergearena.evaluation.model import LanguageModel, _quiet_transformers
from mergearena.evaluation.tasks import MC_RULES

Progress = Callable[[int], None]


@dataclass(frozen=True)
class ChoiceScores:
    scores: tuple[float, ...]  # summed log-probability of each choice's scored tokens
    scored_tokens: tuple[int, ...]  # how many tokens each score sums

    @property
    def prediction(self) -> int:
        """The first choice with the highest score (as torch.max picks)."""
        best = max(self.scores)
        return self.scores.index(best)


@functools.cache
def tune_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the system at once.

    Scoring allocates and frees large activations and logits every batch; with glibc's defaults
    each one is a fresh mmap whose pages fault in again, which cost ~10% of CPU scoring time
    (measured: 12.0 s -> 10.9 s on 40 CosmosQA rows). Blocks up to 1 GiB come from the heap and
    up to 2 GiB of free heap is kept. Process-wide, once; only with glibc; opt out with
    MERGEARENA_NO_MALLOC_TUNING=1. Returns whether the settings were applied.
    """
    if os.environ.get("MERGEARENA_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 31))


@functools.cache
def _logits_to_keep_support(model_class: type) -> tuple[bool, bool]:
    """(takes ``logits_to_keep`` at all, takes a boolean mask for it): newer transformers
    slice with ``slice_logits_to_keep``, which accepts a mask; older ones only int or 1-D."""
    forward = model_class.forward
    if "logits_to_keep" not in inspect.signature(forward).parameters:
        return False, False
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return True, False
    return True, "slice_logits_to_keep" in source


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """The name ``forward`` takes the KV cache by: ``cache`` from transformers 5.24 on (which
    warns on every call given ``past_key_values``), ``past_key_values`` before."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _returned_cache(out: object) -> object:
    """The KV cache a forward returned, under either transformers' name for it."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values  # type: ignore[attr-defined]


def encode_prompts(
    lm: LanguageModel, prompts: Sequence[str], *, special_tokens: bool = True
) -> list[list[int]]:
    """Token ids of each prompt, as the starter kit's input tokenizer makes them."""
    encoded = lm.tokenizer(
        list(prompts), add_special_tokens=special_tokens, truncation=True, padding=False
    )["input_ids"]
    return [list(ids) for ids in encoded]


class StarterKitWarning(UserWarning):
    """Rows whose one-token choices score 0.0 under the starter-kit rule, as in the kit."""


def _row_names(ids: Sequence[str], shown: int = 20) -> str:
    names = ", ".join(repr(i) for i in ids[:shown])
    return names + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def encode_choices(
    lm: LanguageModel,
    choices: Sequence[Sequence[str]],
    rule: str,
    ids: Sequence[str] | None = None,
    *,
    task: str | None = None,
    kit_batch_size: int = 1,
) -> list[list[list[int]]]:
    """Token ids of each example's choices under ``rule`` (see the module docstring).

    Under ``starter-kit``, on a decoder whose tokenizer appends no EOS, a one-token choice has no
    token to score: the kit right-pads the choices of its batch, so its score is the masked,
    empty sum 0.0, and as log-probabilities are negative it usually wins. That is reproduced
    (the scorer leaves such a choice at 0.0; ties go to the first choice, as ``torch.max``), with
    one ``StarterKitWarning`` naming the rows. The kit fails only when every choice of one of its
    batches is one token long (no position is left to score and its reshape of the empty scores
    raises); those rows are refused here with an ``EvaluationError``. The kit's batches are runs
    of ``kit_batch_size`` examples in order: 1 in the kit's own evaluation loop (its DataLoader
    has batch size 1), the caller's batch where its ``predict_multiple_choice`` is called
    directly. How this scorer batches is irrelevant: a choice's score never depends on it.
    ``ids`` and ``task`` name the rows in messages.
    """
    flat = [choice for group in choices for choice in group]
    if lm.is_seq2seq:
        encoded = lm.tokenizer(flat, truncation=True, padding=False)["input_ids"]
    elif rule in ("loglik", "starter-kit"):
        encoded = lm.tokenizer(flat, add_special_tokens=False, padding=False)["input_ids"]
        if rule == "starter-kit" and lm.starter_kit_appends_eos:
            encoded = [list(ids) + [lm.tokenizer.eos_token_id] for ids in encoded]
    else:
        raise EvaluationError(
            f"multiple-choice rule {rule!r} does not score choices: use loglik or starter-kit"
            if rule in MC_RULES
            else f"multiple-choice rule {rule!r} is not one of {', '.join(MC_RULES)}"
        )
    names = list(ids) if ids is not None else [f"#{index}" for index in range(len(choices))]
    where = f"task {task}: " if task else ""
    result, position = [], 0
    for index, group in enumerate(choices):
        token_lists = [list(t) for t in encoded[position : position + len(group)]]
        position += len(group)
        if min(len(t) for t in token_lists) == 0:
            raise EvaluationError(
                f"{where}row {names[index]!r}: an answer choice encodes to no tokens"
            )
        result.append(token_lists)
    if rule == "starter-kit" and not lm.is_seq2seq:
        _check_starter_kit_choices(result, names, where, kit_batch_size)
    return result


def _check_starter_kit_choices(
    choices: list[list[list[int]]], names: list[str], where: str, kit_batch_size: int
) -> None:
    """Refuse the rows where the starter kit fails, warn about those it scores 0.0 (see
    ``encode_choices``); a choice with EOS appended is never one token long."""
    if kit_batch_size < 1:
        raise EvaluationError(f"kit batch size must be at least 1, got {kit_batch_size}")
    failing: list[str] = []
    for start in range(0, len(choices), kit_batch_size):
        batch = choices[start : start + kit_batch_size]
        if all(len(tokens) == 1 for group in batch for tokens in group):
            failing += names[start : start + kit_batch_size]
    if failing:
        raise EvaluationError(
            f"{where}under --mc-rule starter-kit, every answer choice is one token long in "
            f"{len(failing)} row(s): {_row_names(failing)}. The rule scores a choice's tokens "
            "after its first and this tokenizer appends no EOS, so nothing is left to score: the "
            "starter kit itself fails there (its predict_multiple_choice cannot reshape the "
            "empty scores). Use --mc-rule loglik or letter, or answer choices of several tokens."
        )
    empty = [names[i] for i, group in enumerate(choices) if any(len(t) == 1 for t in group)]
    if empty:
        warnings.warn(
            f"{where}under --mc-rule starter-kit, {len(empty)} row(s) have a one-token answer "
            f"choice, which scores 0.0 (the empty sum, as the starter kit's padding makes it) "
            f"and so usually wins: {_row_names(empty)}. Use --mc-rule loglik for new work.",
            StarterKitWarning,
            stacklevel=3,
        )


def _pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool, device: torch.device):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
    return ids.to(device), mask.to(device)


def _row_sums(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> list[float]:
    """Per row of ``keep`` (rows × positions), the summed log-probability of ``targets`` at its
    kept positions; ``logits`` holds the kept positions only, flattened in row-major order."""
    logits = logits.float()
    picked = logits.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
    per_position = torch.zeros(keep.shape, dtype=torch.float32, device=logits.device)
    per_position[keep] = picked - torch.logsumexp(logits, dim=-1)
    return per_position.sum(-1).cpu().tolist()


def _length_chunks(lengths: list[int], slack: float = 1.25) -> list[list[int]]:
    """Split rows sorted by decreasing length into runs whose padding stays under ``slack``:
    a run's padded size (rows × its first, longest row) is at most ``slack`` × its real tokens."""
    chunks: list[list[int]] = []
    real = 0
    for k, length in enumerate(lengths):
        if chunks and (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] <= slack * (real + length):
            chunks[-1].append(k)
            real += length
        else:
            chunks.append([k])
            real = length
    return chunks


def _choice_pass(
    lm: LanguageModel,
    prompt_mask: torch.Tensor,
    cache: object,
    rows: list[tuple[int, int]],
    choices: list[list[list[int]]],
    keep_mask: bool,
) -> list[float]:
    """Summed log-probabilities of tokens 2..n of each (example, choice) row, after its prompt."""
    model, device, pad_id = lm.model, lm.device, lm.tokenizer.pad_token_id
    owner = torch.tensor([i for i, _ in rows], device=device)
    fed, fed_mask = _pad([choices[i][j][:-1] for i, j in rows], pad_id, False, device)
    targets, _ = _pad([choices[i][j][1:] for i, j in rows], pad_id, False, device)
    cache.batch_select_indices(owner)
    positions = prompt_mask.sum(-1)[owner][:, None] + torch.arange(fed.shape[1], device=device)
    keep = fed_mask.bool()
    extra = {"logits_to_keep": keep} if keep_mask else {}
    out = model(
        input_ids=fed,
        attention_mask=torch.cat([prompt_mask[owner], fed_mask], dim=1),
        position_ids=positions,
        use_cache=True,
        **{_cache_keyword(type(model)): cache},
        **extra,
    )
    logits = out.logits
    logits = logits.reshape(-1, logits.shape[-1]) if keep_mask else logits[keep]
    return _row_sums(logits, targets, keep)


def _decoder_batch(
    lm: LanguageModel, prompts: list[list[int]], choices: list[list[list[int]]], rule: str
) -> list[ChoiceScores]:
    model, device = lm.model, lm.device
    pad_id = lm.tokenizer.pad_token_id
    keep_last, keep_mask = _logits_to_keep_support(type(model))
    ids, mask = _pad(prompts, pad_id, left=True, device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if keep_last else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    totals = [[0.0] * len(group) for group in choices]
    if rule == "loglik":  # the first choice token, from the prompt's last position
        first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1).cpu()
        for i, group in enumerate(choices):
            for j, tokens in enumerate(group):
                totals[i][j] += float(first[i, tokens[0]])

    # One row per choice with at least one token to feed: the choice without its last token.
    rows = [(i, j) for i, group in enumerate(choices) for j, t in enumerate(group) if len(t) > 1]
    rows.sort(key=lambda row: -len(choices[row[0]][row[1]]))
    chunks = _length_chunks([len(choices[i][j]) - 1 for i, j in rows])
    for number, chunk in enumerate(chunks):
        # The last chunk takes the prompt cache itself; the others a copy of it.
        prompt_cache = _returned_cache(out)
        cache = prompt_cache if number == len(chunks) - 1 else copy.deepcopy(prompt_cache)
        chunk_rows = [rows[k] for k in chunk]
        for (i, j), value in zip(
            chunk_rows,
            _choice_pass(lm, mask, cache, chunk_rows, choices, keep_mask),
            strict=True,
        ):
            totals[i][j] += value
    counted = 0 if rule == "loglik" else 1
    return [
        ChoiceScores(tuple(t), tuple(len(c) - counted for c in group))
        for t, group in zip(totals, choices, strict=True)
    ]


def _seq2seq_batch(
    lm: LanguageModel, prompts: list[list[int]], choices: list[list[list[int]]]
) -> list[ChoiceScores]:
    model, device = lm.model, lm.device
    pad_id = lm.tokenizer.pad_token_id
    ids, mask = _pad(prompts, pad_id, left=False, device=device)
    encoded = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = [(i, j) for i, group in enumerate(choices) for j in range(len(group))]
    owner = torch.tensor([i for i, _ in rows], device=device)
    labels, label_mask = _pad([choices[i][j] for i, j in rows], pad_id, False, device)
    decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
    out = model(
        encoder_outputs=(encoded[owner],),
        attention_mask=mask[owner],
        decoder_input_ids=decoder_ids,
        use_cache=False,
    )
    keep = label_mask.bool()
    sums = _row_sums(out.logits[keep], labels, keep)
    totals = [[0.0] * len(group) for group in choices]
    for (i, j), value in zip(rows, sums, strict=True):
        totals[i][j] = value
    return [
        ChoiceScores(tuple(t), tuple(len(c) for c in group))
        for t, group in zip(totals, choices, strict=True)
    ]


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def score_choices(
    lm: LanguageModel,
    prompts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[Sequence[int]]],
    *,
    rule: str = "loglik",
    batch_size: int = 8,
    progress: Progress | None = None,
) -> list[ChoiceScores]:
    """Score encoded choices after encoded prompts (see ``encode_prompts``/``encode_choices``).

    Examples run longest first, so an out-of-memory error shows at the start.
    """
    if batch_size < 1:
        raise EvaluationError(f"batch size must be at least 1, got {batch_size}")
    cost = [len(p) + sum(len(c) for c in group) for p, group in zip(prompts, choices, strict=True)]
    order = sorted(range(len(prompts)), key=lambda k: (-len(prompts[k]), -cost[k]))
    results: list[ChoiceScores | None] = [None] * len(prompts)
    if lm.device.type == "cpu":
        tune_cpu_allocator()
    with torch.inference_mode(), _quiet_transformers():
        for batch in _batches(order, batch_size):
            batch_prompts = [list(prompts[k]) for k in batch]
            batch_choices = [[list(c) for c in choices[k]] for k in batch]
            if lm.is_seq2seq:
                scored = _seq2seq_batch(lm, batch_prompts, batch_choices)
            else:
                scored = _decoder_batch(lm, batch_prompts, batch_choices, rule)
            for k, result in zip(batch, scored, strict=True):
                results[k] = result
            if progress is not None:
                progress(len(batch))
    return results  # type: ignore[return-value]


def _stop_at_strings(tokenizer: object, prompt_length: int, stop: Sequence[str]) -> object:
    """A stopping criterion that ends each row once its new text holds one of ``stop``.

    Only the last few new tokens are decoded per step (enough to hold the longest stop string),
    so the check stays cheap for long generations and never looks into the prompt.
    """
    from transformers import StoppingCriteria

    window = max(len(text) for text in stop) + 2

    class StopAtStrings(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: object, **kwargs: object):
            tails = tokenizer.batch_decode(
                input_ids[:, max(prompt_length, input_ids.shape[1] - window) :],
                skip_special_tokens=True,
            )
            done = [any(text in tail for text in stop) for tail in tails]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopAtStrings()


def _cut_at(text: str, stop: Sequence[str]) -> str:
    ends = [text.find(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text


def generate(
    lm: LanguageModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    stop: Sequence[str] = (),
    progress: Progress | None = None,
) -> list[str]:
    """Greedy continuations of encoded prompts, stopping at EOS or ``max_new_tokens``, or once
    the new text holds a ``stop`` string (the text is cut where the first one begins).

    Batches are left padded (explicit attention masks, so padding changes nothing) and decoded
    with special tokens skipped, as the starter kit decodes.
    """
    if batch_size < 1:
        raise EvaluationError(f"batch size must be at least 1, got {batch_size}")
    if any(not text for text in stop):
        raise EvaluationError("a stop string is empty")
    tokenizer, model, device = lm.tokenizer, lm.model, lm.device
    order = sorted(range(len(prompts)), key=lambda k: -len(prompts[k]))
    texts: list[str] = [""] * len(prompts)
    if lm.device.type == "cpu":
        tune_cpu_allocator()
    with torch.inference_mode(), _quiet_transformers():
        for batch in _batches(order, batch_size):
            rows = [list(prompts[k]) for k in batch]
            ids, mask = _pad(rows, tokenizer.pad_token_id, left=not lm.is_seq2seq, device=device)
            extra = {}
            if stop:
                from transformers import StoppingCriteriaList

                prompt_length = 1 if lm.is_seq2seq else ids.shape[1]  # seq2seq: decoder start
                extra["stopping_criteria"] = StoppingCriteriaList(
                    [_stop_at_strings(tokenizer, prompt_length, stop)]
                )
            output = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                **extra,
            )
            new = output if lm.is_seq2seq else output[:, ids.shape[1] :]
            decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
            for k, text in zip(batch, decoded, strict=True):
                texts[k] = _cut_at(text, stop)
            if progress is not None:
                progress(len(batch))
    return texts
