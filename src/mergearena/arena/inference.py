"""A submission's own inference: its prediction hooks, called on task inputs as the kit called them.

In the competition the evaluation called the submission's ``predict_multiple_choice(batch)`` and
``generate(batch)``, and winners overrode them (chain-of-thought with an answer regex, few-shot
prompts). The runner does the same, inside the sandbox, on the task *inputs* only (the batch
layout and return conventions are in ``mergearena.arena.runner``'s docstring). Every value a hook
returns is checked here before it becomes a prediction, and a failure names the task, the row id
and what was wrong; the worker checks the predictions file again outside the sandbox
(``arena.scoring``), since nothing written inside is trusted.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from mergearena.errors import SubmissionError
from mergearena.evaluation.tasks import GENERATION, MULTIPLE_CHOICE, Example, Task

BATCH_SIZE = 1  # the starter kit's evaluation loop: DataLoader(batch_size=1)
HOOK_NAMES = {MULTIPLE_CHOICE: "predict_multiple_choice", GENERATION: "generate"}
RETURNS = {
    MULTIPLE_CHOICE: "(predicted_choice, answer_choice_scores)",
    GENERATION: "(generated_ids, generated_texts)",
}

Batch = dict[str, list[Any]]


@dataclass(frozen=True)
class Hooks:
    """A submission's own prediction functions by eval type, each called with one batch.
    ``owner`` names them in messages: the starter-kit class or the submission's file."""

    owner: str = ""
    by_type: dict[str, Callable[[Batch], Any]] = field(default_factory=dict)

    def label(self, eval_type: str) -> str:
        return f"{self.owner}.{HOOK_NAMES[eval_type]}"


def starter_kit_hooks(method: Any) -> Hooks:
    """The kit methods that ``method``'s class overrides (one that is not ``Merges``'s own), bound
    to ``method``; the others keep mergearena's scorer."""
    from llm_merging.merging.Merges import Merges

    cls = type(method)
    found = {
        eval_type: getattr(method, name)
        for eval_type, name in HOOK_NAMES.items()
        if getattr(cls, name, None) is not getattr(Merges, name)
    }
    return Hooks(cls.__name__, found)


def module_hook_functions(module: ModuleType, label: str) -> dict[str, Callable[..., Any]]:
    """The hooks a single-file submission defines: module-level ``predict_multiple_choice`` and
    ``generate`` functions *defined in it* (an imported ``generate`` is not one), each taking
    ``(model, tokenizer, batch)``."""
    found = {}
    for eval_type, name in HOOK_NAMES.items():
        function = getattr(module, name, None)
        if function is None or getattr(function, "__module__", None) != module.__name__:
            continue
        try:
            inspect.signature(function).bind(None, None, {})
        except (TypeError, ValueError):
            raise SubmissionError(
                f"{label}: {name} must be a function of (model, tokenizer, batch) returning "
                f"{RETURNS[eval_type]}, as the starter kit's Merges.{name} does"
            ) from None
        found[eval_type] = function
    return found


def bind_module_hooks(
    functions: dict[str, Callable[..., Any]], model: Any, tokenizer: Any, owner: str
) -> Hooks:
    return Hooks(
        owner,
        {t: functools.partial(function, model, tokenizer) for t, function in functions.items()},
    )


def starter_kit_batch(examples: Sequence[Example]) -> Batch:
    """The starter kit's collated batch of task-input rows: the CSV's columns as keys, a list of
    values each (``answer_choices`` as the CSV holds it, a list literal; none for generation)."""
    batch: Batch = {"id": [e.id for e in examples], "input": [e.input for e in examples]}
    if examples[0].eval_type == MULTIPLE_CHOICE:
        batch["answer_choices"] = [repr(list(e.choices)) for e in examples]
    batch["eval_type"] = [e.eval_type for e in examples]
    return batch


def predict(task: Task, hooks: Hooks, *, batch_size: int = BATCH_SIZE) -> dict[str, str]:
    """Prediction text by row id for the examples of ``task`` whose eval type has a hook: the
    chosen index for multiple choice, the generated text otherwise. Raises ``SubmissionError``
    when a hook raises (its traceback printed first) or returns something it must not."""
    import torch

    predictions: dict[str, str] = {}
    for eval_type, hook in hooks.by_type.items():
        examples = [e for e in task.examples if e.eval_type == eval_type]
        label = hooks.label(eval_type)
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            try:
                with torch.no_grad():  # as the starter kit's evaluation loop
                    returned = hook(starter_kit_batch(chunk))
            except (Exception, SystemExit) as error:
                traceback.print_exc()
                raise SubmissionError(
                    f"{_where(task.name, chunk, label)} raised {type(error).__name__}: {error} "
                    "(its traceback is above)"
                ) from None
            check = check_choices if eval_type == MULTIPLE_CHOICE else check_texts
            texts = check(returned, chunk, task=task.name, label=label)
            predictions.update((e.id, text) for e, text in zip(chunk, texts, strict=True))
    return predictions


def check_choices(
    returned: Any, examples: Sequence[Example], *, task: str, label: str
) -> list[str]:
    """The choice indices in what ``label`` (a ``predict_multiple_choice``) returned for a batch
    of ``examples`` of ``task``, as text: one integer in range per example, or a
    ``SubmissionError`` naming the task, the row id and what was wrong."""
    where = _where(task, examples, label)
    values = _first_or_second(returned, 0, MULTIPLE_CHOICE, where)
    shape = getattr(values, "shape", None)
    if shape is not None and hasattr(values, "tolist"):  # a tensor or an array
        if tuple(shape) != (len(examples),):
            raise SubmissionError(
                f"{where}: predicted_choice has shape {tuple(shape)}; it must have shape "
                f"({len(examples)},), one choice index per example of the batch"
            )
        values = values.tolist()
    if not isinstance(values, list | tuple):
        raise SubmissionError(
            f"{where}: predicted_choice must be a tensor, array or list of one choice index per "
            f"example; got {_describe(values)}"
        )
    _check_count(values, examples, "predicted choice", where)
    texts = []
    for example, value in zip(examples, values, strict=True):
        row = _where(task, [example], label)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise SubmissionError(
                f"{row}: predicted {_describe(value)}, not a choice index (an integer)"
            )
        index = int(value)  # a numpy or torch integer too
        if not 0 <= index < len(example.choices):
            raise SubmissionError(
                f"{row}: predicted choice {index}, out of range for its "
                f"{len(example.choices)} choices (0 to {len(example.choices) - 1})"
            )
        texts.append(str(index))
    return texts


def check_texts(returned: Any, examples: Sequence[Example], *, task: str, label: str) -> list[str]:
    """The texts in what ``label`` (a ``generate``) returned for a batch of ``examples`` of
    ``task``: one ``str`` per example, or a ``SubmissionError`` naming the task, the row id and
    what was wrong."""
    where = _where(task, examples, label)
    texts = _first_or_second(returned, 1, GENERATION, where)
    if not isinstance(texts, list | tuple):
        raise SubmissionError(
            f"{where}: generated_texts must be a list of one str per example; "
            f"got {_describe(texts)}"
        )
    _check_count(texts, examples, "generated text", where)
    checked = []
    for example, text in zip(examples, texts, strict=True):
        row = _where(task, [example], label)
        if not isinstance(text, str):
            raise SubmissionError(f"{row}: generated {_describe(text)}, not text (a str)")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise SubmissionError(
                f"{row}: generated text that is not valid Unicode ({error})"
            ) from None
        checked.append(str(text))
    return checked


def _first_or_second(returned: Any, index: int, eval_type: str, where: str) -> Any:
    """Item ``index`` of the pair the kit's methods return (its evaluation unpacks two values)."""
    if not (isinstance(returned, tuple | list) and len(returned) == 2):
        raise SubmissionError(
            f"{where} must return {RETURNS[eval_type]}, as the starter kit's does; "
            f"it returned {_describe(returned)}"
        )
    return returned[index]


def _check_count(values: Sequence[Any], examples: Sequence[Example], what: str, where: str) -> None:
    if len(values) != len(examples):
        raise SubmissionError(
            f"{where}: returned {len(values)} {what}(s) for a batch of {len(examples)} "
            "example(s); it must return one per example, in the batch's order"
        )


def _where(task: str, examples: Sequence[Example], label: str) -> str:
    ids = [repr(e.id) for e in examples]
    rows = ids[0] if len(ids) == 1 else f"{ids[0]} to {ids[-1]} ({len(ids)} rows)"
    return f"task {task}, row id {rows}: {label}"


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    kind = type(value).__name__
    if shape is not None and len(shape) > 0:
        return f"a {kind} of shape {tuple(shape)}"
    text = repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({kind})"
