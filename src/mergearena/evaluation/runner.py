"""Evaluate a model on tasks and write scores, predictions, a per-sample log and a submission."""

from __future__ import annotations

import contextlib
import csv
import json
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mergearena.checkpoints.writer import atomic_directory
from mergearena.errors import EvaluationError, TaskError
from mergearena.evaluation import scoring, strategies
from mergearena.evaluation.metrics import generation_metrics
from mergearena.evaluation.strategies import Shot
from mergearena.evaluation.tasks import (
    GENERATION,
    MC_RULES,
    MULTIPLE_CHOICE,
    CotSettings,
    Example,
    Task,
    load_task,
)
from mergearena.models import LanguageModel


@dataclass
class ExampleResult:
    example: Example
    prompt: str
    prediction: int | str
    scores: tuple[float, ...] | None = None  # multiple choice: each choice's log-probability
    metrics: dict[str, float] = field(default_factory=dict)  # empty without a target
    generation: str | None = None  # cot: the reasoning generated; prediction -1 if no letter
    extracted_by: str | None = None  # cot: "pattern", a fallback's name, or None (a miss)

    @property
    def prediction_text(self) -> str:
        return str(self.prediction)


@dataclass
class TaskResult:
    task: Task
    examples: list[ExampleResult]
    mc_rule: str
    seconds: float
    batch_size: int
    fewshot: int = 0  # few-shot examples before each multiple-choice prompt
    cot: CotSettings | None = None  # the settings used under mc_rule cot
    empty_choice_rows: list[str] = field(default_factory=list)  # starter-kit rows with 0.0 scores

    @property
    def scored(self) -> bool:
        return self.task.has_targets

    @property
    def metrics(self) -> dict[str, float]:
        if not self.scored:
            return {}
        keys = sorted({k for r in self.examples for k in r.metrics})
        return {
            k: statistics.fmean(r.metrics[k] for r in self.examples if k in r.metrics) for k in keys
        }

    @property
    def main_value(self) -> float | None:
        """The mean over examples of each one's main metric (accuracy for multiple choice)."""
        if not self.scored:
            return None
        generation_metric = self.task.main_metric
        return statistics.fmean(
            r.metrics["accuracy"]
            if r.example.eval_type == MULTIPLE_CHOICE
            else r.metrics[generation_metric]
            for r in self.examples
        )

    def summary(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"n": len(self.examples), "scored": self.scored}
        if self.scored:
            entry.update(
                main_metric=self.task.main_metric, main=self.main_value, metrics=self.metrics
            )
        if any(r.example.eval_type == MULTIPLE_CHOICE for r in self.examples):
            entry["mc_rule"] = self.mc_rule
            entry["fewshot"] = self.fewshot
            if self.cot is not None:
                entry["cot"] = self.cot.model_dump()
            if self.empty_choice_rows:
                entry["empty_choice_rows"] = self.empty_choice_rows
        entry.update(
            seconds=round(self.seconds, 3),
            examples_per_second=round(len(self.examples) / max(self.seconds, 1e-9), 3),
            batch_size=self.batch_size,
        )
        return entry


def average(results: Sequence[TaskResult]) -> float | None:
    values = [r.main_value for r in results if r.scored]
    return statistics.fmean(values) if values else None  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- prompts


def render_prompt(
    lm: LanguageModel,
    task: Task,
    example: Example,
    chat: bool,
    *,
    rule: str = "loglik",
    shots: Sequence[Shot] | None = None,
    cot: CotSettings | None = None,
) -> str:
    """The text the model sees: few-shot examples, the question as ``rule`` asks it (the template
    applied; lettered options under letter and cot), and the chat template if asked. ``shots``
    defaults to the sidecar's few-shot examples; ``cot`` to the sidecar's CoT settings."""
    if shots is None:
        shots = sidecar_shots(task)
    question = strategies.question_prompt(task, example, rule, cot or task.settings.cot)
    if chat:
        if not getattr(lm.tokenizer, "chat_template", None):
            raise EvaluationError(
                f"task {task.name}: a chat template was asked for, but {lm.name}'s tokenizer has "
                "none; drop --chat-template (or chat_template in the sidecar)"
            )
        messages: list[dict[str, str]] = []
        for shot in shots:
            messages.append({"role": "user", "content": shot.prompt})
            messages.append({"role": "assistant", "content": shot.answer.lstrip()})
        messages.append({"role": "user", "content": question})
        return lm.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    return "".join(shot.prompt + shot.answer + "\n\n" for shot in shots) + question


def sidecar_shots(task: Task) -> list[Shot]:
    """The sidecar's few-shot examples: the template applied to the input, the output as written."""
    return [
        Shot(task.render(Example("", s.input, GENERATION)), s.output) for s in task.settings.fewshot
    ]


def select_shots(
    task: Task,
    rule: str,
    cot: CotSettings,
    *,
    count: int | None = None,
    source: str | Path | None = None,
) -> dict[str, list[Shot]]:
    """The few-shot examples of each eval type, in the format of ``rule``.

    With ``source`` (a task CSV, or a directory holding ``<task>.csv``): its first ``count`` rows
    of the type, with targets, that are not rows of ``task`` itself (so a task file can serve as
    its own pool under ``--limit``). Otherwise the sidecar's ``fewshot`` list (the first
    ``count``), or under ``cot`` the built-in worked examples (three unless ``count`` says);
    ``count`` 0 turns every source off.
    """
    types = (MULTIPLE_CHOICE, GENERATION)
    if count is not None and count < 0:
        raise EvaluationError(f"--fewshot must be 0 or more, got {count}")
    if source is not None:
        if count is None:
            raise EvaluationError("--fewshot-from needs --fewshot N: how many examples to show")
        path = Path(source)
        path = path / f"{task.name}.csv" if path.is_dir() else path
        pool = load_task(path)
        scored = {e.id for e in task.examples}
        chosen: dict[str, list[Shot]] = {}
        for eval_type in types:
            if not any(e.eval_type == eval_type for e in task.examples):
                chosen[eval_type] = []
                continue
            rows = [
                e
                for e in pool.examples
                if e.eval_type == eval_type and e.target is not None and e.id not in scored
            ]
            if len(rows) < count:
                raise EvaluationError(
                    f"task {task.name}: --fewshot {count}, but {path} has {len(rows)} {eval_type} "
                    "row(s) with targets that are not rows of the task itself"
                )
            chosen[eval_type] = [
                strategies.shot_from_example(task, e, rule, cot) for e in rows[:count]
            ]
        return chosen
    if task.settings.fewshot:
        shots = sidecar_shots(task)
        if count is not None and count > len(shots):
            raise EvaluationError(
                f"task {task.name}: --fewshot {count}, but its sidecar has {len(shots)} fewshot "
                "example(s); give --fewshot-from FILE for more"
            )
        shots = shots[:count] if count is not None else shots
        return dict.fromkeys(types, shots)
    if rule == "cot":
        worked = strategies.COT_EXAMPLES
        if count is not None and count > len(worked):
            raise EvaluationError(
                f"task {task.name}: --fewshot {count}, but there are {len(worked)} built-in "
                "chain-of-thought examples; give --fewshot-from FILE or sidecar fewshot examples"
            )
        shots = [
            strategies.shot_from_example(task, example, rule, cot, reasoning)
            for example, reasoning in worked[: len(worked) if count is None else count]
        ]
        return {MULTIPLE_CHOICE: shots, GENERATION: []}
    if count:
        raise EvaluationError(
            f"task {task.name}: --fewshot {count}, but the task has no few-shot examples: give "
            "--fewshot-from FILE (or a fewshot list in its sidecar)"
        )
    return dict.fromkeys(types, [])


def resolve_cot(task: Task, overrides: Mapping[str, Any] | None) -> CotSettings:
    """The task's CoT settings with ``overrides`` (keys of ``CotSettings``) applied, validated."""
    if not overrides:
        return task.settings.cot
    try:
        return CotSettings.model_validate({**task.settings.cot.model_dump(), **overrides})
    except ValidationError as error:
        problems = "; ".join(
            f"cot.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise EvaluationError(f"task {task.name}: {problems}") from None


def choose_strategy(
    task: Task,
    *,
    mc_rule: str | None = None,
    fewshot: int | None = None,
    fewshot_from: str | Path | None = None,
    cot: Mapping[str, Any] | None = None,
) -> tuple[str, CotSettings, dict[str, list[Shot]]]:
    """How ``task``'s questions are asked: the multiple-choice rule (``mc_rule``, else the
    sidecar's, else loglik), the CoT settings (``resolve_cot``) and the few-shot examples of
    each eval type (``select_shots``). It needs no model, so settings that cannot work (more
    examples than there are, a bad ``cot`` key) can be refused before a model is loaded."""
    rule = mc_rule or task.settings.mc_rule or "loglik"
    if rule not in MC_RULES:
        raise EvaluationError(f"--mc-rule {rule!r} is not one of {', '.join(MC_RULES)}")
    cot_settings = resolve_cot(task, cot)
    shots = select_shots(task, rule, cot_settings, count=fewshot, source=fewshot_from)
    return rule, cot_settings, shots


# ---------------------------------------------------------------------------------------- running


def _is_oom(error: RuntimeError) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _with_batch_size(
    lm: LanguageModel,
    batch_size: int | str,
    run: Callable[[int, int | None], Any],
    n: int,
) -> tuple[Any, int]:
    """Call ``run(examples per batch, token budget)``: with a number, that many examples and no
    token budget; with "auto", the device's limits (``scoring.auto_limits``), both halved until
    the work fits in memory. Returns what ``run`` returned and the examples per batch."""
    if batch_size != "auto":
        if not isinstance(batch_size, int) or batch_size < 1:
            raise EvaluationError(
                f"batch size must be a positive integer or 'auto', got {batch_size!r}"
            )
        return run(batch_size, None), batch_size
    size, budget = scoring.auto_limits(lm.device)
    size = max(1, min(size, n))
    while True:
        try:
            return run(size, budget), size
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not _is_oom(error) or size == 1:
                raise
            size, budget = size // 2, max(1, budget // 2)
            if lm.device.type == "cuda":
                torch.cuda.empty_cache()


def evaluate_task(
    lm: LanguageModel,
    task: Task,
    *,
    mc_rule: str | None = None,
    batch_size: int | str = "auto",
    chat_template: bool | None = None,
    fewshot: int | None = None,
    fewshot_from: str | Path | None = None,
    cot: Mapping[str, Any] | None = None,
    progress: scoring.Progress | None = None,
) -> TaskResult:
    """Score one task. ``mc_rule``, ``chat_template`` and ``cot`` (keys of ``CotSettings``)
    override the task's sidecar when given; ``fewshot``/``fewshot_from`` choose its few-shot
    examples (see ``select_shots``)."""
    started = time.perf_counter()
    rule, cot_settings, shots = choose_strategy(
        task, mc_rule=mc_rule, fewshot=fewshot, fewshot_from=fewshot_from, cot=cot
    )
    chat = task.settings.chat_template if chat_template is None else chat_template
    prompts = [
        render_prompt(lm, task, e, chat, rule=rule, shots=shots[e.eval_type], cot=cot_settings)
        for e in task.examples
    ]
    # A chat template writes its own special tokens; plain prompts get the tokenizer's (BOS).
    encoded = scoring.encode_prompts(lm, prompts, special_tokens=not chat)
    mc = [k for k, e in enumerate(task.examples) if e.eval_type == MULTIPLE_CHOICE]
    gen = [k for k, e in enumerate(task.examples) if e.eval_type == GENERATION]
    results: dict[int, ExampleResult] = {}
    used = 0
    empty_rows: list[str] = []
    if mc and rule == "cot":
        answered, used = _ask_with_reasoning(
            lm,
            task,
            mc,
            prompts=prompts,
            encoded=encoded,
            cot=cot_settings,
            batch_size=batch_size,
            progress=progress,
        )
        results.update(answered)
    elif mc:
        if rule == "letter":  # each letter after the lettered prompt, as a one-token choice
            texts = [
                strategies.letter_texts(prompts[k], strategies.option_letters(task.examples[k]))
                for k in mc
            ]
            choice_rule = "loglik"
        else:
            texts = [list(task.examples[k].choices) for k in mc]
            choice_rule = rule
        choices = scoring.encode_choices(
            lm, texts, choice_rule, [task.examples[k].id for k in mc], task=task.name
        )
        scored, used = _with_batch_size(
            lm,
            batch_size,
            lambda size, budget: scoring.score_choices(
                lm,
                [encoded[k] for k in mc],
                choices,
                rule=choice_rule,
                batch_size=size,
                token_budget=budget,
                progress=progress,
            ),
            len(mc),
        )
        for k, score in zip(mc, scored, strict=True):
            example = task.examples[k]
            if 0 in score.scored_tokens:
                empty_rows.append(example.id)
            metrics = {}
            if example.target is not None:
                metrics = {"accuracy": float(score.prediction == example.target)}
                if rule != "letter":
                    # lm-eval's acc_norm: log-probability per character of the choice.
                    normed = [
                        s / len(c) for s, c in zip(score.scores, example.choices, strict=True)
                    ]
                    metrics["accuracy_norm"] = float(normed.index(max(normed)) == example.target)
            results[k] = ExampleResult(example, prompts[k], score.prediction, score.scores, metrics)
    if gen:
        texts, used_gen = _with_batch_size(
            lm,
            batch_size,
            lambda size, budget: scoring.generate(
                lm,
                [encoded[k] for k in gen],
                max_new_tokens=task.settings.max_new_tokens,
                batch_size=size,
                token_budget=budget,
                progress=progress,
            ),
            len(gen),
        )
        used = used or used_gen
        for k, text in zip(gen, texts, strict=True):
            example = task.examples[k]
            metrics = (
                {} if example.target is None else generation_metrics(text, str(example.target))
            )
            results[k] = ExampleResult(example, prompts[k], text, None, metrics)
    ordered = [results[k] for k in range(len(task.examples))]
    return TaskResult(
        task,
        ordered,
        rule,
        time.perf_counter() - started,
        used,
        fewshot=len(shots[MULTIPLE_CHOICE]) if mc else 0,
        cot=cot_settings if mc and rule == "cot" else None,
        empty_choice_rows=empty_rows,
    )


def _ask_with_reasoning(
    lm: LanguageModel,
    task: Task,
    rows: list[int],
    *,
    prompts: list[str],
    encoded: list[list[int]],
    cot: CotSettings,
    batch_size: int | str,
    progress: scoring.Progress | None,
) -> tuple[dict[int, ExampleResult], int]:
    """Chain of thought on the multiple-choice ``rows``: generate, read each answer letter (a
    miss predicts -1 and counts wrong). Returns the results by row and the batch size used."""
    results: dict[int, ExampleResult] = {}
    for k in rows:
        strategies.option_letters(task.examples[k])  # more than ten options fail before running
    texts, used = _with_batch_size(
        lm,
        batch_size,
        lambda size, budget: scoring.generate(
            lm,
            [encoded[k] for k in rows],
            max_new_tokens=cot.max_new_tokens,
            batch_size=size,
            token_budget=budget,
            stop=cot.stop,
            progress=progress,
        ),
        len(rows),
    )
    for k, text in zip(rows, texts, strict=True):
        example = task.examples[k]
        index, extracted_by = strategies.extract_answer(text, len(example.choices), cot)
        prediction = -1 if index is None else index
        metrics = {}
        if example.target is not None:
            metrics = {
                "accuracy": float(prediction == example.target),
                "answered": float(index is not None),
            }
        results[k] = ExampleResult(
            example, prompts[k], prediction, None, metrics, text, extracted_by
        )
    return results, used


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[str], scoring.Progress]]:
    """Yield ``start(label) -> advance(n)``; a rich bar with examples/s, or nothing."""
    if not enabled:
        yield lambda _label: lambda _n: None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.2f} examples/s"),
        TimeElapsedColumn(),
    )
    with bar:

        def start(label: str) -> scoring.Progress:
            task_id = bar.add_task(label, total=total, rate=0.0)
            started = time.perf_counter()
            done = 0

            def advance(n: int) -> None:
                nonlocal done
                done += n
                rate = done / max(time.perf_counter() - started, 1e-9)
                bar.update(task_id, advance=n, rate=rate)

            return advance

        yield start


def evaluate(
    lm: LanguageModel,
    tasks: Sequence[Task],
    *,
    mc_rule: str | None = None,
    batch_size: int | str = "auto",
    chat_template: bool | None = None,
    fewshot: int | None = None,
    fewshot_from: str | Path | None = None,
    cot: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> list[TaskResult]:
    """Evaluate ``lm`` on each task in turn (see ``evaluate_task``)."""
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TaskError(
            f"several task files are named {', '.join(duplicates)}; task names must differ"
        )
    results = []
    for task in tasks:
        with _progress_bar(progress, len(task.examples)) as start:
            results.append(
                evaluate_task(
                    lm,
                    task,
                    mc_rule=mc_rule,
                    batch_size=batch_size,
                    chat_template=chat_template,
                    fewshot=fewshot,
                    fewshot_from=fewshot_from,
                    cot=cot,
                    progress=start(task.name),
                )
            )
    return results


# ---------------------------------------------------------------------------------------- outputs


def scores_document(results: Sequence[TaskResult], **about: Any) -> dict[str, Any]:
    return {
        "average": average(results),
        "tasks": {r.task.name: r.summary() for r in results},
        **about,
    }


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_outputs(
    results: Sequence[TaskResult], out: str | Path, *, overwrite: bool = False, **about: Any
) -> dict[str, Any]:
    """Write scores.json, predictions/<task>.csv, samples.jsonl and, for target-less tasks,
    submission.csv (the competition's ``id,prediction,dummy_field`` format). All files appear
    together: they are written to a temporary directory moved into place when complete."""
    unscored = [r for r in results if not r.scored]
    ids = [e.example.id for r in unscored for e in r.examples]
    if len(set(ids)) != len(ids):
        raise TaskError(
            "the target-less tasks share example ids, so one submission.csv cannot hold them; "
            "evaluate them in separate runs"
        )
    document = scores_document(results, **about)
    with atomic_directory(out, overwrite=overwrite) as directory:
        (directory / "scores.json").write_text(json.dumps(document, indent=2) + "\n")
        predictions = directory / "predictions"
        predictions.mkdir()
        for result in results:
            write_csv(
                predictions / f"{result.task.name}.csv",
                ("id", "prediction"),
                [(r.example.id, r.prediction_text) for r in result.examples],
            )
        with (directory / "samples.jsonl").open("w", encoding="utf-8") as log:
            for result in results:
                for r in result.examples:
                    record = {
                        "task": result.task.name,
                        "id": r.example.id,
                        "eval_type": r.example.eval_type,
                        "input": r.prompt,
                        "choices": list(r.example.choices) or None,
                        "scores": list(r.scores) if r.scores is not None else None,
                        "prediction": r.prediction,
                        "target": r.example.target,
                        "metrics": r.metrics or None,
                    }
                    if r.generation is not None:  # cot: the reasoning, and what read the answer
                        record.update(generation=r.generation, extracted_by=r.extracted_by)
                    log.write(json.dumps(record, ensure_ascii=False) + "\n")
        if unscored:
            write_csv(
                directory / "submission.csv",
                ("id", "prediction", "dummy_field"),
                [(e.example.id, e.prediction_text, 0) for r in unscored for e in r.examples],
            )
    return document
