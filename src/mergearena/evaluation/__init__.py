"""Evaluation on the competition's CSV task format: multiple choice and generation.

Python API::

    from mergearena.evaluation import load_task, evaluate, write_outputs
    from mergearena.models import LanguageModel
    lm = LanguageModel.load("out/merged", device="cpu", dtype="float32")
    results = evaluate(lm, [load_task("cosmos_qa.csv")], mc_rule="loglik", batch_size="auto")
    write_outputs(results, "eval/")        # scores.json, predictions/, samples.jsonl

Strategies: ``mc_rule`` ``letter`` (lettered options, the letter's logit) or ``cot`` (chain of
thought; ``cot={"max_new_tokens": 128}`` overrides ``CotSettings``), ``fewshot=3`` with
``fewshot_from="train.csv"`` for few-shot examples (see evaluation/strategies.py).

Models load through ``mergearena.models`` (the layer below this one):
``LanguageModel.from_state_dict(base, state_dict)`` scores weights held in memory (a merge
candidate in a search loop) without writing them to disk.
"""

from mergearena.evaluation.runner import (
    ExampleResult,
    TaskResult,
    average,
    evaluate,
    evaluate_task,
    scores_document,
    write_outputs,
)
from mergearena.evaluation.scoring import (
    ChoiceScores,
    StarterKitWarning,
    encode_choices,
    encode_prompts,
    generate,
    score_choices,
)
from mergearena.evaluation.tasks import CotSettings, Example, Task, TaskSettings, load_task

__all__ = [
    "ChoiceScores",
    "CotSettings",
    "Example",
    "ExampleResult",
    "StarterKitWarning",
    "Task",
    "TaskResult",
    "TaskSettings",
    "average",
    "encode_choices",
    "encode_prompts",
    "evaluate",
    "evaluate_task",
    "generate",
    "load_task",
    "score_choices",
    "scores_document",
    "write_outputs",
]
