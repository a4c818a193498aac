"""Merge search: the space is checked before any trial, trials merge in memory exactly as
`mergearena merge` writes, studies resume, Ray workers may die, outputs are recipes users run."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from typer.testing import CliRunner

from mergearena.cli import app
from mergearena.engine import TensorCache, iter_output_tensors, merge, merge_to_state_dict
from mergearena.errors import RecipeError, SearchError
from mergearena.search import SearchSettings, parse_space, run_search

BASE = "zoo:smollm2-135m"
TASKS = ["sentiment", "spam"]


def space_text(**top) -> str:
    document = {
        "merge_method": {"choice": ["task_arithmetic", "ties"]},
        "base_model": BASE,
        "models": [
            {"model": "zoo:sentiment-lora", "parameters": {"weight": {"search": [0.5, 1.5]}}},
            {
                "model": "zoo:spam-lora",
                "include": {"choice": [True, False]},
                "parameters": {"weight": 1.0, "density": {"search": [0.3, 1.0]}},
            },
        ],
        "parameters": {"lambda": {"search": [0.5, 1.5], "log": True}},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    document.update(top)
    return yaml.safe_dump(document, sort_keys=False)


def write_space(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------- the space alone


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            {
                "parameters": {"lambda": 1.0},
                "merge_method": "task_arithmetic",
                "models": [{"model": "zoo:sentiment-lora", "parameters": {"weight": 1.0}}],
            },
            "nothing to search",
        ),
        ({"parameters": {"lambda": {"search": [1.5, 0.5]}}}, r"lambda: search: low 1.5 is above"),
        (
            {"parameters": {"lambda": {"search": [0.0, 1.0], "log": True}}},
            "log range needs LOW > 0",
        ),
        (
            {"parameters": {"lambda": {"search": [0.5, 1.0], "steps": 2}}},
            r"unknown key\(s\) \['steps'\]",
        ),
        (
            {"parameters": {"lamda": {"search": [0.5, 1.0]}}},
            "none of task_arithmetic, ties takes 'lamda'",
        ),
        ({"merge_method": "ties", "parameters": {"lamda": 1.0}}, "ties has no parameter 'lamda'"),
        ({"parameters": {"lambda": {"choice": []}}}, "choice: a non-empty list"),
        (
            {"merge_method": {"choice": ["ties", "lora_concat"]}},
            "lora_concat writes a LoRA adapter",
        ),
        ({"merge_method": {"choice": ["ties", "tiez"]}}, "tiez"),
        ({"base_model": {"choice": [BASE, "zoo:other"]}}, "base_model cannot be searched"),
        (
            {"merge_method": "slerp", "parameters": {"t": {"search": [0.2, 0.8]}}},
            r"slerp",
        ),
    ],
)
def test_a_bad_space_is_refused_before_any_trial_naming_the_key(tmp_path, change, problem):
    document = yaml.safe_load(space_text())
    document.update(change)
    path = write_space(tmp_path, yaml.safe_dump(document))
    with pytest.raises(RecipeError, match=problem):
        parse_space(path)


def test_a_value_outside_the_parameters_range_is_refused_at_that_end(tmp_path):
    document = yaml.safe_load(space_text())
    document["models"][1]["parameters"]["density"] = {"search": [0.3, 1.5]}
    with pytest.raises(RecipeError, match=r"high end: .*density.* must be in"):
        parse_space(write_space(tmp_path, yaml.safe_dump(document)))


def test_a_trial_sets_only_what_its_method_takes_and_leaves_out_excluded_models(tmp_path):
    text = space_text(merge_method={"choice": ["geometric_median", "ties"]})
    space = parse_space(write_space(tmp_path, text))
    assert [d.name for d in space.dimensions] == [
        "merge_method",
        "lambda",
        "sentiment-lora.weight",
        "spam-lora.include",
        "spam-lora.density",
    ]
    trial = optuna.trial.FixedTrial(
        {
            "merge_method": "geometric_median",
            "lambda": 0.7,
            "sentiment-lora.weight": 1.2,
            "spam-lora.include": True,
        }
    )
    document = space.recipe(trial)
    assert document["merge_method"] == "geometric_median"
    assert document["parameters"] == {"lambda": 0.7}
    assert document["models"][1] == {"model": "zoo:spam-lora", "parameters": {"weight": 1.0}}
    trial = optuna.trial.FixedTrial(
        {
            "merge_method": "ties",
            "lambda": 0.7,
            "sentiment-lora.weight": 1.2,
            "spam-lora.include": False,
        }
    )
    document = space.recipe(trial)
    assert [m["model"] for m in document["models"]] == ["zoo:sentiment-lora"]


def test_a_searched_gradient_names_each_point(tmp_path):
    document = yaml.safe_load(space_text(merge_method="ties"))
    document["models"][1]["parameters"]["density"] = [{"search": [0.2, 0.5]}, 0.9]
    space = parse_space(write_space(tmp_path, yaml.safe_dump(document)))
    assert "spam-lora.density[0]" in [d.name for d in space.dimensions]
    trial = optuna.trial.FixedTrial(
        {
            "lambda": 1.0,
            "sentiment-lora.weight": 1.0,
            "spam-lora.include": True,
            "spam-lora.density[0]": 0.25,
        }
    )
    assert space.recipe(trial)["models"][1]["parameters"]["density"] == [0.25, 0.9]


def test_a_search_never_reads_a_test_split(tmp_path):
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    (test_dir / "sentiment.csv").write_text("id,input,target,answer_choices,eval_type\n")
    settings = SearchSettings(
        write_space(tmp_path, space_text()), [str(test_dir / "sentiment.csv")], tmp_path / "o"
    )
    with pytest.raises(SearchError, match="never reads a test split"):
        run_search(settings)


def test_unreachable_storage_and_ray_address_fail_before_any_trial(zoo_ready, tmp_path):
    space = write_space(tmp_path, space_text())
    settings = SearchSettings(
        space, TASKS, tmp_path / "o", storage="postgresql+psycopg://nobody@127.0.0.1:1/none"
    )
    with pytest.raises(SearchError, match=r"--storage postgresql\+psycopg://.*cannot be reached"):
        run_search(settings)
    settings = SearchSettings(space, TASKS, tmp_path / "p", workers=2, ray_address="127.0.0.1:1")
    with pytest.raises(SearchError, match=r"--ray-address 127.0.0.1:1: Ray does not answer"):
        run_search(settings)


# ------------------------------------------------------------------------------ merging in memory


@pytest.fixture(scope="module")
def zoo_ready():
    from mergearena.checkpoints.refs import model_ref_exists

    if not model_ref_exists(BASE):
        pytest.skip("the zoo is not prepared: run `mergearena zoo prepare`")


@pytest.mark.zoo
@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_a_merge_in_memory_is_the_merge_on_disk_bit_for_bit(zoo_ready, tmp_path, method):
    """Also when its inputs come from the cache a previous merge filled."""
    recipe = {
        "merge_method": method,
        "base_model": BASE,
        "models": [
            {"model": "zoo:sentiment-lora", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "zoo:spam-lora", "parameters": {"weight": 0.7, "density": 0.5}},
        ],
        "parameters": {"lambda": 1.0},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    if method == "task_arithmetic":
        for entry in recipe["models"]:
            del entry["parameters"]["density"]
    merge(recipe, tmp_path / "out")
    on_disk = dict(iter_output_tensors(tmp_path / "out"))
    cache = TensorCache(2**40)
    for _ in range(2):
        in_memory = merge_to_state_dict(recipe, cache=cache)
        assert in_memory.keys() == on_disk.keys()
        for name, tensor in on_disk.items():
            assert torch.equal(in_memory[name], tensor), name
    assert cache.held > 0


# ---------------------------------------------------------------------------------------- studies


def settings_for(tmp_path: Path, **changes) -> SearchSettings:
    values = {"trials": 3, "limit": 4, "seed": 1, "prune": False}
    values.update(changes)
    return SearchSettings(write_space(tmp_path, space_text()), TASKS, tmp_path / "study", **values)


@pytest.mark.zoo
@pytest.mark.slow
def test_the_cli_writes_a_best_recipe_that_mergearena_merge_runs_unchanged(zoo_ready, tmp_path):
    space = write_space(tmp_path, space_text())
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "search",
            str(space),
            "--tasks",
            TASKS[0],
            "--tasks",
            TASKS[1],
            "--out",
            str(tmp_path / "s"),
            "--trials",
            "3",
            "--limit",
            "4",
            "--holdout",
            "0.25",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "s"
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 3 and {r["state"] for r in rows} <= {"complete", "pruned", "fail"}
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG"
    holdout = list(csv.DictReader((out / "holdout.csv").open()))
    assert holdout and "holdout_average" in holdout[0]
    best = (out / "best.yaml").read_text()
    assert best.startswith("# Found by `mergearena search space.yaml`")
    merged = runner.invoke(
        app, ["merge", str(out / "best.yaml"), "--out", str(tmp_path / "m"), "--quiet"]
    )
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "m" / "config.json").is_file()
    again = runner.invoke(
        app,
        [
            "search",
            str(space),
            "--tasks",
            "sentiment",
            "--tasks",
            "spam",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert again.exit_code == 2 and "pass --resume" in again.output


@pytest.mark.zoo
@pytest.mark.slow
def test_a_study_resumes_marks_a_killed_trial_failed_and_refuses_another_space(zoo_ready, tmp_path):
    settings = settings_for(tmp_path, trials=2)
    first = run_search(settings, log=lambda _: None)
    assert first.ran == 2
    # A process killed mid-trial leaves a running trial behind.
    storage = f"sqlite:///{settings.out / 'study.db'}"
    optuna.load_study(study_name="space", storage=storage).ask()
    settings.trials, settings.resume = 4, True
    notes: list[str] = []
    second = run_search(settings, log=notes.append)
    states = [t.state.name for t in second.study.trials]
    assert states.count("FAIL") == 1 and len(states) == 4 and second.ran == 1
    assert "marked 1 trial(s)" in notes[0]
    failed = next(t for t in second.study.trials if t.state.name == "FAIL")
    assert failed.user_attrs["reason"] == "left running by a process that stopped"
    settings.space.write_text(space_text(seed=3))
    with pytest.raises(SearchError, match="started with another space"):
        run_search(settings)


@pytest.mark.zoo
@pytest.mark.slow
def test_ctrl_c_leaves_a_study_that_resumes(zoo_ready, tmp_path):
    settings = settings_for(tmp_path, trials=3)
    calls = []

    def interrupt(trial, pool):
        calls.append(trial.number)
        if len(calls) == 2:
            raise KeyboardInterrupt

    report = run_search(settings, on_trial=interrupt, log=lambda _: None)
    assert report.interrupted
    assert [t.state.name for t in report.study.trials] == ["COMPLETE", "FAIL"]
    settings.resume = True
    report = run_search(settings, log=lambda _: None)
    assert [t.state.name for t in report.study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]


@pytest.mark.zoo
@pytest.mark.slow
def test_several_objectives_write_the_pareto_front_as_recipes(zoo_ready, tmp_path):
    settings = settings_for(tmp_path, objectives=["sentiment", "size"], sampler="nsga2")
    report = run_search(settings, log=lambda _: None)
    front = sorted((settings.out / "pareto").glob("*.yaml"))
    assert front and len(front) == len(report.study.best_trials)
    assert (settings.out / "pareto.png").is_file()
    sizes = [t.values[1] for t in report.study.trials if t.state.name == "COMPLETE"]
    assert all(size > 0 for size in sizes)  # every candidate moved away from the base


@pytest.mark.zoo
@pytest.mark.slow
def test_ray_workers_run_trials_and_a_worker_killed_mid_trial_fails_only_its_trial(
    zoo_ready, tmp_path
):
    settings = settings_for(tmp_path, trials=4, workers=2)
    killed = []

    def kill_first(trial, pool):
        if not killed:
            pid = pool.pids()[0]
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    report = run_search(settings, on_trial=kill_first, log=lambda _: None)
    states = [t.state.name for t in report.study.trials]
    assert len(states) == 4 and states.count("FAIL") == 1, states
    failed = next(t for t in report.study.trials if t.state.name == "FAIL")
    assert "the worker died" in failed.user_attrs["reason"]
    assert states.count("COMPLETE") == 3
