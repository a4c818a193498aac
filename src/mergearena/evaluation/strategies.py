"""How a multiple-choice question is asked: lettered options, letter answers, chain of thought.

Under the rules ``letter`` and ``cot`` (see ``tasks.MC_RULES``) a question is shown with its
options lettered A, B, C... and an answer cue (``lettered_prompt``):

- ``letter`` scores the letter tokens after the cue (one forward pass per prompt; the letter
  with the highest logit wins, which is the highest log-probability, as both share the softmax);
- ``cot`` generates a reasoning (greedy) after the cue and the CoT cue, and reads the answer letter
  from it (``extract_answer``); a reasoning without a valid letter is a miss, counted wrong.

Few-shot examples (``Shot``) are rendered in the format of the rule, so a model sees its answer
format before answering. Chain of thought without few-shot examples of its own gets three worked
examples (``COT_EXAMPLES``), as the competition's 2nd place used three.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mergearena.errors import EvaluationError
from mergearena.evaluation.tasks import GENERATION, CotSettings, Example, Task

LETTERS = "ABCDEFGHIJ"  # at most ten options, as the CoT pattern's [A-J]
ANSWER_COLON = re.compile(r"[Aa]nswer:\s*\(?([A-J])\)?(?![A-Za-z])")


@dataclass(frozen=True)
class Shot:
    """A few-shot example: the prompt it shows and the answer that follows it."""

    prompt: str
    answer: str


def option_letters(example: Example) -> str:
    if len(example.choices) > len(LETTERS):
        raise EvaluationError(
            f"example {example.id!r}: {len(example.choices)} answer choices, but lettered "
            f"options go up to {LETTERS[-1]} ({len(LETTERS)}); use --mc-rule loglik"
        )
    return LETTERS[: len(example.choices)]


def _options_shown(text: str, letters: str, choices: Sequence[str]) -> bool:
    """Whether ``text`` lists every choice on its own line as ``A. text``, ``A) text`` or
    ``(A) text``, or the choices are the letters themselves (the competition's CosmosQA)."""
    stripped = [c.strip() for c in choices]
    if stripped == list(letters):
        return True
    return all(
        re.search(rf"(?m)^[ \t]*\(?{letter}[.):][ \t]*{re.escape(choice)}[ \t]*$", text)
        for letter, choice in zip(letters, stripped, strict=True)
    )


def _letter_bullets(text: str, letters: str, choices: Sequence[str]) -> str | None:
    """``text`` with its bulleted options (``- choice`` lines, one per choice, in order: the
    competition's CosmosQA) lettered instead, or None if the text has no such list."""
    position, pieces = 0, []
    for letter, choice in zip(letters, choices, strict=True):
        bullet = re.compile(rf"(?m)^[ \t]*[-*\u2022][ \t]*({re.escape(choice.strip())})[ \t]*$")
        match = bullet.search(text, position)
        if match is None:
            return None
        pieces += [text[position : match.start()], f"{letter}. {match.group(1)}"]
        position = match.end()
    return "".join(pieces) + text[position:]


def lettered_prompt(text: str, example: Example) -> str:
    """``text`` (the rendered prompt of ``example``) with its options lettered, ending in a cue.

    Options the text already lists (see ``_options_shown``) are left as they are, and options
    it lists as bullets (``- choice``) get letters instead. Otherwise ``Options:`` and one
    ``A. choice`` line per choice go before the text's last line when that line is an answer
    cue (it ends in ``:``, like ``Answer:``), else after the text. The result ends in an answer
    cue: the text's own, or ``Answer:`` added on a new line.
    """
    letters = option_letters(example)
    body = text.rstrip()
    bulleted = _letter_bullets(body, letters, example.choices)
    if bulleted is not None:
        body = bulleted
    elif not _options_shown(body, letters, example.choices):
        options = "\n".join(
            f"{letter}. {choice.strip()}"
            for letter, choice in zip(letters, example.choices, strict=True)
        )
        head, newline, last = body.rpartition("\n")
        if newline and last.strip().endswith(":"):
            return f"{head}\nOptions:\n{options}\n{last.strip()}"
        return f"{body}\nOptions:\n{options}\nAnswer:"
    last = body.rpartition("\n")[2]
    return body if last.strip().endswith(":") else f"{body}\nAnswer:"


def letter_texts(prompt: str, letters: str) -> list[str]:
    """The letters as the model would write them after ``prompt``: `` A`` after a cue such as
    ``Answer:``, ``A`` after whitespace (a chat template's assistant turn starts on a new line)."""
    space = "" if not prompt or prompt[-1].isspace() else " "
    return [space + letter for letter in letters]


def cot_answer(letter: str, reasoning: str | None) -> str:
    """A few-shot answer in the default pattern's format: the reasoning, then the letter."""
    if reasoning:
        return f" {reasoning} So the answer is ({letter})."
    return f" The answer is ({letter})."


def shot_from_example(
    task: Task, example: Example, rule: str, cot: CotSettings, reasoning: str | None = None
) -> Shot:
    """A row with a target as a few-shot example of ``rule`` (its prompt as the task renders it)."""
    text = task.render(example)
    if example.eval_type == GENERATION:
        return Shot(text, str(example.target))
    target = int(example.target)  # type: ignore[arg-type]
    if rule in ("letter", "cot"):
        prompt = lettered_prompt(text, example)
        letter = option_letters(example)[target]
        if rule == "letter":
            return Shot(prompt, letter_texts(prompt, letter)[0])
        return Shot(prompt + cot.cue, cot_answer(letter, reasoning))
    return Shot(text, example.choices[target])


def question_prompt(task: Task, example: Example, rule: str, cot: CotSettings) -> str:
    """The prompt text of the example being asked (without few-shot examples or chat format)."""
    text = task.render(example)
    if example.eval_type == GENERATION or rule not in ("letter", "cot"):
        return text
    prompt = lettered_prompt(text, example)
    return prompt + cot.cue if rule == "cot" else prompt


def extract_answer(text: str, n_choices: int, cot: CotSettings) -> tuple[int | None, str | None]:
    """(choice index, which extractor found it) from a generated reasoning, or (None, None).

    In order: the first match of ``cot.pattern`` (its first group is the letter), then each of
    ``cot.fallbacks``: ``answer-colon``, the first ``Answer: X``; ``last-letter``, the last
    standalone capital letter among the example's options. A letter beyond the example's options
    (``E`` of four) counts as no match, and the next extractor is tried.
    """
    letters = LETTERS[:n_choices]
    extractors: list[tuple[str, str | None]] = [("pattern", _first(cot.pattern, text))]
    for name in cot.fallbacks:
        if name == "answer-colon":
            extractors.append((name, _first(ANSWER_COLON, text)))
        else:
            found = re.findall(rf"(?<![A-Za-z0-9])([{letters}])(?![A-Za-z0-9])", text)
            extractors.append((name, found[-1] if found else None))
    for extractor, letter in extractors:
        if letter is not None and len(letter) == 1 and letter in letters:
            return letters.index(letter), extractor
    return None, None


def _first(pattern: str | re.Pattern[str], text: str) -> str | None:
    match = re.search(pattern, text)
    return match.group(1) if match else None


# Three worked examples for chain of thought (the 2nd place used three): arithmetic, reading a
# short story (CosmosQA's kind), and knowledge; answers B, C, A so no letter is favoured.
COT_EXAMPLES: tuple[tuple[Example, str], ...] = (
    (
        Example(
            "cot-example-1",
            "Question: Tom has 3 apples and buys 2 more. How many apples does he have now?",
            "multiple_choice",
            ("1", "5", "6", "32"),
            1,
        ),
        "Tom starts with 3 apples and buys 2 more, and 3 + 2 = 5.",
    ),
    (
        Example(
            "cot-example-2",
            "Sara left her umbrella at home. On her way to work it started to rain hard, and "
            "when she reached the office her clothes were soaked.\n"
            "Question: Why were Sara's clothes wet?",
            "multiple_choice",
            (
                "She went swimming before work.",
                "She spilled her coffee.",
                "She walked in the rain without an umbrella.",
                "None of the above choices.",
            ),
            2,
        ),
        "Sara had no umbrella and it rained hard while she walked to work, so the rain soaked "
        "her clothes. Swimming and coffee are not mentioned.",
    ),
    (
        Example(
            "cot-example-3",
            "Question: Which of these animals is a mammal?",
            "multiple_choice",
            ("Whale", "Shark", "Trout", "Octopus"),
            0,
        ),
        "Sharks and trout are fish and an octopus is a mollusc, while a whale breathes air and "
        "feeds its young on milk, so it is a mammal.",
    ),
)
