"""Batched multiple-choice scoring and greedy generation.

Multiple choice, decoder models: the prompts of a batch are encoded once (left padding, explicit
positions so padding changes nothing) and their KV cache is shared by every choice of the example.
The prompt pass computes the LM head on the last position only; the choice pass feeds each choice
without its last token (whose logits no rule needs), in runs of similar length (``chunk_rows``),
each reading the prompt cache without copying it (``_shared_prompt_cache``).

Batches can be planned by tokens, not only by examples (``plan_batches``; batch size "auto" does):
examples run longest first, and the cuts keep each batch's padded size within a token budget and
trade padding against the fixed cost of a forward pass, so long prompts come a few at a time and
short ones many. On a GPU the loop does not wait for the device: inputs go up from pinned memory
without blocking and the scores stay on the device until every batch has run (transformers itself
still reads a padded prompt batch's mask on the host, once a batch).

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

import bisect
import copy
import functools
import inspect
import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mergearena.errors import EvaluationError
from mergearena.evaluation.tasks import MC_RULES
from mergearena.malloc import tune_cpu_allocator
from mergearena.models import LanguageModel, cache_keyword, quiet_transformers, returned_cache

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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
def _takes_logits_to_keep(model_class: type[torch.nn.Module]) -> bool:
    """Whether ``forward`` can compute the LM head on the last positions only."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


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


# Limits of a batch where the batch size is "auto", by device type: examples per batch and padded
# tokens per forward pass, halved together on an out-of-memory error. cpu: SmolLM2-135M scored the
# zoo's tasks as fast with 1024, 2048 or 4096 tokens a pass, and generates about twice as fast
# with many short prompts a batch as with 8 (each new token reads all the weights); cuda: an 8B
# model on an H200 scored 500 CosmosQA rows in 3.5 s with 16384, 32768 or 65536 tokens alike.
AUTO_LIMITS = {"cpu": (64, 2048), "cuda": (256, 32768)}
OTHER_AUTO_LIMITS = (16, 4096)
# What one forward pass costs beyond its tokens (its Python and kernel launches, one read of the
# weights), in tokens' worth: runs of choices trade padding against passes by it (``chunk_rows``).
PASS_OVERHEAD = {"cpu": 32, "cuda": 512}
# Logits one choice pass may hold: float32 elements (256 MiB on a CPU, 4 GiB on a GPU).
LOGITS_BUDGET = {"cpu": 1 << 26, "cuda": 1 << 30}


def auto_limits(device: torch.device) -> tuple[int, int]:
    """(examples per batch, padded tokens per forward pass) where the batch size is "auto"."""
    return AUTO_LIMITS.get(device.type, OTHER_AUTO_LIMITS)


def plan_batches(
    order: Sequence[int],
    lengths: Sequence[int],
    *,
    batch_size: int,
    token_budget: int | None,
    overhead: int = 0,
) -> list[list[int]]:
    """Cut ``order`` (example indices, longest first by ``lengths``) into batches.

    Without a ``token_budget``, runs of ``batch_size`` examples. With one, the runs of
    ``chunk_rows``: at most ``batch_size`` examples and ``token_budget`` padded tokens each
    (examples × the first, longest one's length; a longer example runs alone), cut to trade
    padding against ``overhead`` tokens' worth per batch.
    """
    if token_budget is None:
        return [list(order[k : k + batch_size]) for k in range(0, len(order), batch_size)]
    runs = chunk_rows(
        [lengths[k] for k in order], budget=token_budget, overhead=overhead, max_rows=batch_size
    )
    return [[order[k] for k in run] for run in runs]


def chunk_rows(
    lengths: Sequence[int], *, budget: int, overhead: int, max_rows: int | None = None
) -> list[range]:
    """Cut rows sorted by decreasing length into runs, each fed in one forward pass padded to its
    first (longest) row.

    The cuts minimize the tokens fed (padding included) plus ``overhead`` per run, with at most
    ``max_rows`` rows and ``budget`` padded tokens a run (a row longer than that runs alone).
    Runs are tried that end where the length changes or where a limit stops them: dynamic
    programming over the rows, O(rows × distinct lengths).
    """
    n = len(lengths)
    changes = [k for k in range(1, n) if lengths[k] != lengths[k - 1]] + [n]
    cost = [0] * (n + 1)  # cost[k]: the least cost of rows k.. (0 for none)
    end_of = [n] * (n + 1)
    for start in range(n - 1, -1, -1):
        width = lengths[start]
        rows = budget // width if max_rows is None else min(max_rows, budget // width)
        limit = min(n, start + max(1, rows))
        ends = changes[bisect.bisect_right(changes, start) : bisect.bisect_right(changes, limit)]
        cost[start], end_of[start] = min(
            ((end - start) * width + overhead + cost[end], end) for end in (*ends, limit)
        )
    runs, start = [], 0
    while start < n:
        runs.append(range(start, end_of[start]))
        start = end_of[start]
    return runs


def _pad(
    rows: Sequence[Sequence[int]], pad_id: int, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``rows``, padded to the longest, on the host."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
    return ids, mask


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU from pinned memory, so the host does not wait."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _row_sums(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per row of ``keep`` (rows × positions), the summed log-probability of ``targets`` at its
    kept positions (``logits``: rows × positions × vocabulary), on the device."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked - torch.logsumexp(logits, dim=-1), 0.0).sum(-1)


@functools.cache
def _shared_layer_classes() -> tuple[type, type] | None:
    """(``DynamicLayer``, ``SharedPromptLayer``: see inside), or None where transformers has no
    ``DynamicLayer``."""
    try:
        from transformers.cache_utils import DynamicLayer  # slow to import; older ones lack it
    except ImportError:
        return None

    class SharedPromptLayer(DynamicLayer):
        """One layer of a prompt batch's KV cache, read by rows of choices (row r after prompt
        ``owner[r]``) and never grown: ``update`` returns each row's prompt states followed by
        its new ones and keeps nothing. So every run of choices reads the same prompt cache, and
        the only copy made is the one attention needs, one layer at a time."""

        def __init__(self, prompt: DynamicLayer, owner: torch.Tensor) -> None:
            self.__dict__.update(prompt.__dict__)
            self.owner = owner

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            prompt_keys, prompt_values = self.keys, self.values
            if prompt_keys is None or prompt_values is None:
                raise EvaluationError(
                    "a shared prompt cache layer holds no prompt states: run the prompt first"
                )
            keys = torch.cat([prompt_keys[self.owner], key_states], dim=-2)
            values = torch.cat([prompt_values[self.owner], value_states], dim=-2)
            return keys, values

    return DynamicLayer, SharedPromptLayer


def _shared_prompt_cache(prompt_cache: Any, owner: torch.Tensor) -> Any | None:
    """A cache whose row r reads row ``owner[r]`` of ``prompt_cache``, which stays unchanged; None
    unless every layer is a plain ``DynamicLayer`` (sliding windows keep their own rules).

    The caches are transformers' (``Any``: their layout differs across releases, so they are read
    by what they have, not by one release's class)."""
    classes = _shared_layer_classes()
    layers = getattr(prompt_cache, "layers", None)
    if classes is None or not layers or any(type(layer) is not classes[0] for layer in layers):
        return None
    cache = copy.copy(prompt_cache)
    cache.layers = [classes[1](layer, owner) for layer in layers]
    return cache


def _choice_pass(
    lm: LanguageModel,
    prompt_mask: torch.Tensor,
    prompt_cache: Any,
    rows: list[tuple[int, int]],
    choices: list[list[list[int]]],
    last: bool,
) -> torch.Tensor:
    """Summed log-probabilities of tokens 2..n of each (example, choice) row, after its prompt,
    on the device. ``last``: no later run reads ``prompt_cache`` (the fallback may consume it)."""
    model, device, pad_id = lm.model, lm.device, lm.tokenizer.pad_token_id
    owner = _to_device(torch.tensor([i for i, _ in rows]), device)
    fed, fed_mask = (
        _to_device(t, device) for t in _pad([choices[i][j][:-1] for i, j in rows], pad_id, False)
    )
    targets, _ = _pad([choices[i][j][1:] for i, j in rows], pad_id, False)
    targets = _to_device(targets, device)
    cache = _shared_prompt_cache(prompt_cache, owner)
    if cache is None:  # a copy of the cache per run; the last run takes the prompt cache itself
        cache = prompt_cache if last else copy.deepcopy(prompt_cache)
        cache.batch_select_indices(owner)
    positions = prompt_mask.sum(-1)[owner][:, None] + torch.arange(fed.shape[1], device=device)
    out = model(
        input_ids=fed,
        attention_mask=torch.cat([prompt_mask[owner], fed_mask], dim=1),
        position_ids=positions,
        use_cache=True,
        # mypy holds classes unhashable for functools.cache (python/mypy#11470)
        **{cache_keyword(type(model)): cache},  # type: ignore[arg-type]
    )
    return _row_sums(out.logits, targets, fed_mask.bool())


def _vocabulary_size(model: object) -> int:
    head = model.get_output_embeddings()  # type: ignore[attr-defined]
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)  # type: ignore[attr-defined]


def _decoder_batch(
    lm: LanguageModel,
    prompts: list[list[int]],
    choices: list[list[list[int]]],
    slots: list[list[int]],
    *,
    rule: str,
    scores: torch.Tensor,
    run_budget: int,
    pass_overhead: int,
) -> None:
    """Score a batch into ``scores`` (2 × choices, on the device): row 0 the first choice token's
    log-probability (loglik), row 1 the rest's sum; ``slots`` are each choice's columns."""
    model, device = lm.model, lm.device
    ids, mask = (_to_device(t, device) for t in _pad(prompts, lm.tokenizer.pad_token_id, True))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # mypy holds classes unhashable for functools.cache (python/mypy#11470)
    takes_logits_to_keep = _takes_logits_to_keep(type(model))  # type: ignore[arg-type]
    extra = {"logits_to_keep": 1} if takes_logits_to_keep else {}
    # Without padding, no mask: transformers would find it all ones (waiting for the device to
    # say so) and drop it for plain causal attention, which is what it gets.
    unpadded = len({len(p) for p in prompts}) == 1
    out = model(
        input_ids=ids,
        attention_mask=None if unpadded else mask,
        position_ids=positions,
        use_cache=True,
        **extra,
    )
    if rule == "loglik":  # the first choice token, from the prompt's last position
        first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
        where = [
            (i, tokens[0], slot)
            for i, group in enumerate(choices)
            for tokens, slot in zip(group, slots[i], strict=True)
        ]
        owner, token, slot = _to_device(torch.tensor(where).T.contiguous(), device)
        scores[0, slot] = first[owner, token]
    prompt_cache = returned_cache(out)
    del out  # the prompt's logits

    # One row per choice with at least one token to feed: the choice without its last token.
    rows = [(i, j) for i, group in enumerate(choices) for j, t in enumerate(group) if len(t) > 1]
    rows.sort(key=lambda row: -len(choices[row[0]][row[1]]))
    runs = chunk_rows(
        [len(choices[i][j]) - 1 for i, j in rows], budget=run_budget, overhead=pass_overhead
    )
    for number, run in enumerate(runs):
        run_rows = [rows[k] for k in run]
        sums = _choice_pass(lm, mask, prompt_cache, run_rows, choices, number == len(runs) - 1)
        columns = _to_device(torch.tensor([slots[i][j] for i, j in run_rows]), device)
        scores[1, columns] = sums


def _seq2seq_batch(
    lm: LanguageModel,
    prompts: list[list[int]],
    choices: list[list[list[int]]],
    slots: list[list[int]],
    *,
    scores: torch.Tensor,
) -> None:
    """Score a batch into row 1 of ``scores`` (see ``_decoder_batch``): the whole choice."""
    model, device = lm.model, lm.device
    pad_id = lm.tokenizer.pad_token_id
    ids, mask = (_to_device(t, device) for t in _pad(prompts, pad_id, False))
    encoded = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = [(i, j) for i, group in enumerate(choices) for j in range(len(group))]
    owner = _to_device(torch.tensor([i for i, _ in rows]), device)
    labels, label_mask = (
        _to_device(t, device) for t in _pad([choices[i][j] for i, j in rows], pad_id, False)
    )
    decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
    out = model(
        encoder_outputs=(encoded[owner],),
        attention_mask=mask[owner],
        decoder_input_ids=decoder_ids,
        use_cache=False,
    )
    columns = _to_device(torch.tensor([slots[i][j] for i, j in rows]), device)
    scores[1, columns] = _row_sums(out.logits, labels, label_mask.bool())


def score_choices(
    lm: LanguageModel,
    prompts: Sequence[Sequence[int]],
    choices: Sequence[Sequence[Sequence[int]]],
    *,
    rule: str = "loglik",
    batch_size: int = 8,
    token_budget: int | None = None,
    progress: Progress | None = None,
) -> list[ChoiceScores]:
    """Score encoded choices after encoded prompts (see ``encode_prompts``/``encode_choices``).

    Batches hold at most ``batch_size`` examples and, with a ``token_budget``, at most that many
    padded prompt tokens (``plan_batches``); the runs of choices keep to the budget too. Examples
    run longest first, so an out-of-memory error shows at the start.
    """
    if batch_size < 1:
        raise EvaluationError(f"batch size must be at least 1, got {batch_size}")
    if token_budget is not None and token_budget < 1:
        raise EvaluationError(f"token budget must be at least 1, got {token_budget}")
    device = lm.device
    cost = [len(p) + sum(len(c) for c in group) for p, group in zip(prompts, choices, strict=True)]
    order = sorted(range(len(prompts)), key=lambda k: (-len(prompts[k]), -cost[k]))
    offsets = list(itertools.accumulate((len(group) for group in choices), initial=0))
    overhead = PASS_OVERHEAD.get(device.type, PASS_OVERHEAD["cuda"])
    # Runs of choices: at most the token budget, and logits within the device's budget.
    logits_budget = LOGITS_BUDGET.get(device.type, LOGITS_BUDGET["cuda"])
    run_budget = max(1, logits_budget // _vocabulary_size(lm.model))
    run_budget = min(run_budget, token_budget or run_budget)
    if device.type == "cpu":
        tune_cpu_allocator()
    with torch.inference_mode(), quiet_transformers():
        scores = torch.zeros((2, offsets[-1]), dtype=torch.float32, device=device)
        for batch in plan_batches(
            order,
            [len(p) for p in prompts],
            batch_size=batch_size,
            token_budget=token_budget,
            overhead=overhead,
        ):
            batch_prompts = [list(prompts[k]) for k in batch]
            batch_choices = [[list(c) for c in choices[k]] for k in batch]
            slots = [list(range(offsets[k], offsets[k + 1])) for k in batch]
            if lm.is_seq2seq:
                _seq2seq_batch(lm, batch_prompts, batch_choices, slots, scores=scores)
            else:
                _decoder_batch(
                    lm,
                    batch_prompts,
                    batch_choices,
                    slots,
                    rule=rule,
                    scores=scores,
                    run_budget=run_budget,
                    pass_overhead=overhead,
                )
            if progress is not None:
                progress(len(batch))
        first, rest = scores.cpu().tolist()  # the one wait for the device
    unscored = 0 if rule == "loglik" or lm.is_seq2seq else 1  # tokens a choice's score leaves out
    results = []
    for k, group in enumerate(choices):
        # In Python floats, as the scores always were summed: the first token's part, the rest's.
        totals = tuple(0.0 + first[s] + rest[s] for s in range(offsets[k], offsets[k + 1]))
        results.append(ChoiceScores(totals, tuple(len(c) - unscored for c in group)))
    return results


def _stop_at_strings(
    tokenizer: PreTrainedTokenizerBase, prompt_length: int, stop: Sequence[str]
) -> object:
    """A stopping criterion that ends each row once its new text holds one of ``stop``.

    Only the last few new tokens are decoded per step (enough to hold the longest stop string),
    so the check stays cheap for long generations and never looks into the prompt.
    """
    from transformers import StoppingCriteria  # slow to import: only when generating

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
    token_budget: int | None = None,
    stop: Sequence[str] = (),
    progress: Progress | None = None,
) -> list[str]:
    """Greedy continuations of encoded prompts, stopping at EOS or ``max_new_tokens``, or once
    the new text holds a ``stop`` string (the text is cut where the first one begins).

    Batches hold at most ``batch_size`` prompts and, with a ``token_budget``, at most that many
    padded prompt tokens (``plan_batches``; each row's cache then grows by up to
    ``max_new_tokens``, one token a pass). They are left padded (explicit attention masks, so
    padding changes nothing) and decoded with special tokens skipped, as the starter kit decodes.
    """
    if batch_size < 1:
        raise EvaluationError(f"batch size must be at least 1, got {batch_size}")
    if token_budget is not None and token_budget < 1:
        raise EvaluationError(f"token budget must be at least 1, got {token_budget}")
    if any(not text for text in stop):
        raise EvaluationError("a stop string is empty")
    tokenizer, model, device = lm.tokenizer, lm.model, lm.device
    order = sorted(range(len(prompts)), key=lambda k: -len(prompts[k]))
    texts: list[str] = [""] * len(prompts)
    if lm.device.type == "cpu":
        tune_cpu_allocator()
    with torch.inference_mode(), quiet_transformers():
        for batch in plan_batches(
            order,
            [len(p) for p in prompts],
            batch_size=batch_size,
            token_budget=token_budget,
            overhead=PASS_OVERHEAD.get(device.type, PASS_OVERHEAD["cuda"]),
        ):
            rows = [list(prompts[k]) for k in batch]
            ids, mask = (
                _to_device(t, device)
                for t in _pad(rows, tokenizer.pad_token_id, left=not lm.is_seq2seq)
            )
            extra = {}
            if stop:
                from transformers import StoppingCriteriaList  # slow to import

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
