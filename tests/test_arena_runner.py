"""The arena runner (the sandboxed entry point) and the starter-kit compatibility layer."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergearena.arena.inference import check_choices, check_texts, starter_kit_hooks
from mergearena.arena.policy import ModelPolicy, count_parameters
from mergearena.arena.runner import JobSpec, main, run_job
from mergearena.arena.scoring import score_task
from mergearena.errors import MergeArenaError, SubmissionError
from mergearena.evaluation import CotSettings, Example, Task, load_task
from mergearena.evaluation.metrics import generation_metrics

MC_ROWS = [
    ("q1", "the water is on the long way", "['a way', 'the people', 'no']", "multiple_choice"),
    ("q2", "he was", "['yes', 'no']", "multiple_choice"),
]
GEN_ROWS = [
    ("s1", "the people of the water", "", "generation"),
    ("s2", "what is it", "", "generation"),
]


def write_input(path: Path, rows) -> Path:
    """A task input file as the sandbox gets it: no target column."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("id", "input", "answer_choices", "eval_type"))
        writer.writerows(rows)
    return path


@pytest.fixture
def tasks(tmp_path) -> list[str]:
    folder = tmp_path / "tasks"
    folder.mkdir()
    mc = write_input(folder / "mc.csv", MC_ROWS)
    gen = write_input(folder / "gen.csv", GEN_ROWS)
    (folder / "gen.json").write_text(json.dumps({"max_new_tokens": 3}))  # sidecar, as the harness
    return [str(mc), str(gen)]


@pytest.fixture
def models(make_checkpoint, make_lora) -> dict[str, Path]:
    base = make_checkpoint("llama", seed=0, name="base")
    return {"base": base, "lora1": make_lora(base, seed=1), "lora2": make_lora(base, seed=2)}


def recipe_file(tmp_path: Path, models: dict[str, Path]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        textwrap.dedent(f"""\
            merge_method: task_arithmetic
            base_model: {models["base"]}
            models:
              - model: {models["lora1"]}
                parameters: {{weight: 0.5}}
              - model: {models["lora2"]}
                parameters: {{weight: 0.5}}
            """)
    )
    return path


def read_predictions(path: Path) -> dict[str, str]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", "prediction"]
    return dict(rows[1:])


def job(tmp_path: Path, tasks: list[str], submission: Path, kind: str = "recipe", **extra) -> dict:
    return {
        "kind": kind,
        "submission": str(submission),
        "tasks": tasks,
        "out": str(tmp_path / "out"),
        "dtype": "float32",
        **extra,
    }


# ------------------------------------------------------------------------------------ recipes


def test_recipe_job_predicts_multiple_choice_and_generation(tmp_path, tasks, models):
    spec = job(
        tmp_path,
        tasks,
        recipe_file(tmp_path, models),
        allowed_models=list(map(str, models.values())),
    )
    result = run_job(spec)

    out = tmp_path / "out"
    mc = read_predictions(out / "predictions" / "mc.csv")
    assert list(mc) == ["q1", "q2"] and mc["q1"] in {"0", "1", "2"} and mc["q2"] in {"0", "1"}
    assert list(read_predictions(out / "predictions" / "gen.csv")) == ["s1", "s2"]
    assert json.loads((out / "result.json").read_text()) == result
    assert result["status"] == "ok" and result["method"] == "task_arithmetic"
    assert result["models"] == [str(models[k]) for k in ("base", "lora1", "lora2")]
    assert result["parameters"] == count_parameters(models["base"])
    assert result["merge_seconds"] <= result["seconds"]
    assert result["tasks"]["mc"]["n"] == 2 and not result["tasks"]["mc"]["scored"]
    assert not (out / "model").exists()  # deleted unless keep_model


def test_unlisted_model_is_refused_before_merging(tmp_path, tasks, models, capsys):
    allowed = [str(models["base"]), str(models["lora1"])]
    job_file = tmp_path / "job.json"
    job_file.write_text(
        json.dumps(job(tmp_path, tasks, recipe_file(tmp_path, models), allowed_models=allowed))
    )

    assert main([str(job_file)]) == 2
    error = capsys.readouterr().err
    assert f"model '{models['lora2']}' is not allowed" in error
    assert all(name in error for name in allowed) and "Traceback" not in error
    out = tmp_path / "out"
    assert not (out / "model").exists() and not (out / "predictions").exists()
    assert json.loads((out / "result.json").read_text())["status"] == "error"


def test_allowlist_matches_resolved_paths_and_hub_revisions(models, monkeypatch):
    monkeypatch.chdir(models["base"].parent)
    policy = ModelPolicy([str(models["base"]), "org/model"])
    assert policy.resolve("base") == models["base"].resolve()  # relative path, same directory
    assert policy._listed("org/model@abc123") and not policy._listed("org/other")
    with pytest.raises(SubmissionError, match="'org/other' is not allowed"):
        policy.resolve("org/other")


def test_the_planner_refuses_a_disallowed_model_in_every_position(
    tmp_path, models, make_checkpoint
):
    """The engine's one walk over a recipe's models takes the policy as its resolver: each
    place a model can appear is checked, and a refusal merges nothing."""
    from mergearena.engine import merge

    base, lora = str(models["base"]), str(models["lora1"])
    other = str(make_checkpoint("llama", seed=5, base=models["base"], name="other"))
    declared = json.loads((models["lora1"] / "adapter_config.json").read_text())
    assert declared["base_model_name_or_path"] == base
    every = [base, lora, other]
    linear = "merge_method: linear\nparameters: {weight: 1.0}\nmodels:\n"
    positions = {  # where the model appears: (recipe, the model refused)
        "base_model": (
            f"merge_method: task_arithmetic\nparameters: {{weight: 1.0}}\nbase_model: {base}\n"
            f"models:\n  - model: {other}\n",
            base,
        ),
        "MODEL of MODEL+ADAPTER": (f"{linear}  - model: {base}+{lora}\n", base),
        "ADAPTER of MODEL+ADAPTER": (f"{linear}  - model: {base}+{lora}\n", lora),
        "an adapter's declared base": (f"{linear}  - model: {lora}\n", base),
        "tokenizer_source": (f"{linear}  - model: {base}\ntokenizer_source: {other}\n", other),
    }
    for position, (recipe, refused) in positions.items():
        policy = ModelPolicy([m for m in every if m != refused])
        out = tmp_path / "merged"
        with pytest.raises(SubmissionError, match=f"model '{refused}' is not allowed"):
            merge(recipe, out, resolve=policy.resolve)
        assert not out.exists() and not list(tmp_path.glob(".merged.*")), position

    policy = ModelPolicy(every)
    recipe, _ = positions["MODEL of MODEL+ADAPTER"]
    merge(recipe, tmp_path / "merged", resolve=policy.resolve)
    assert policy.used == [base, lora]


def test_oversized_model_is_refused_from_headers(tmp_path, tasks, models):
    size = count_parameters(models["base"])
    assert size == sum(t.numel() for t in load_file(models["base"] / "model.safetensors").values())
    spec = job(tmp_path, tasks, recipe_file(tmp_path, models), max_parameters=size - 1)
    with pytest.raises(
        SubmissionError, match=f"has {size:,} parameters, more than .* {size - 1:,}"
    ):
        run_job(spec)
    assert not (tmp_path / "out" / "model").exists()


def test_job_spec_is_validated():
    spec = JobSpec(kind="recipe", submission="r.yaml", tasks=["t.csv"], out="o", batch_size="8")
    assert spec.batch_size == 8 and spec.allowed_models == [] and spec.device == "cpu"
    with pytest.raises(MergeArenaError, match="kind.*'recipe', 'code' or 'routed'.*tasks"):
        run_job({"kind": "zip", "submission": "x", "tasks": [], "out": "o"})


@pytest.mark.parametrize(
    ("strategy", "problem"),
    [
        ({"cot": {"max_new_tokens": 0}}, "cot: Value error, max_new_tokens: Input should be"),
        ({"cot": {"paterns": "x"}}, "cot: Value error, paterns: Extra inputs"),
        ({"cot": {"pattern": "no group"}}, "cot: Value error, pattern: needs a group"),
        ({"fewshot": -1}, "fewshot: Input should be greater than or equal to 0"),
    ],
)
def test_a_bad_strategy_in_a_job_is_refused_naming_the_key(strategy, problem):
    with pytest.raises(MergeArenaError, match="invalid job") as refused:
        run_job(
            {"kind": "recipe", "submission": "r.yaml", "tasks": ["t.csv"], "out": "o", **strategy}
        )
    assert problem in str(refused.value)
    spec = JobSpec(kind="recipe", submission="r", tasks=["t"], out="o", cot={"max_new_tokens": "8"})
    assert spec.cot == {"max_new_tokens": 8}  # only the keys given: the rest stay each task's


def test_the_jobs_strategy_reaches_the_evaluation(tmp_path, tasks, models):
    recipe = recipe_file(tmp_path, models)
    allowed = list(map(str, models.values()))
    # cot: the built-in worked examples (the task has none), the job's settings over the defaults
    cot = {"max_new_tokens": 2, "fallbacks": []}
    out = tmp_path / "cot"
    result = run_job(
        job(
            tmp_path,
            tasks,
            recipe,
            allowed_models=allowed,
            out=str(out),
            mc_rule="cot",
            fewshot=2,
            cot=cot,
        )
    )
    mc = result["tasks"]["mc"]
    assert (mc["mc_rule"], mc["fewshot"]) == ("cot", 2)
    assert mc["cot"]["max_new_tokens"] == 2 and mc["cot"]["fallbacks"] == []
    assert mc["cot"]["pattern"] == CotSettings().pattern
    # Two tokens of the tiny vocabulary hold no answer letter, and no fallback is allowed: both
    # rows are misses, -1 (which the arena's scorer counts wrong).
    assert read_predictions(out / "predictions" / "mc.csv") == {"q1": "-1", "q2": "-1"}
    # letter, on the multiple-choice task only (a generation task without few-shot examples of
    # its own cannot show one): the first of the sidecar's examples
    folder = Path(tasks[0]).parent
    shots = [{"input": "he was", "output": "yes"}, {"input": "it is", "output": "no"}]
    (folder / "mc.json").write_text(json.dumps({"fewshot": shots}))
    out = tmp_path / "letter"
    result = run_job(
        job(
            tmp_path,
            tasks[:1],
            recipe,
            allowed_models=allowed,
            out=str(out),
            mc_rule="letter",
            fewshot=1,
        )
    )
    mc = result["tasks"]["mc"]
    assert (mc["mc_rule"], mc["fewshot"]) == ("letter", 1) and "cot" not in mc
    # The letters are all <unk> to the tiny tokenizer: equal scores, so the first choice wins.
    assert read_predictions(out / "predictions" / "mc.csv") == {"q1": "0", "q2": "0"}


def test_a_strategy_the_tasks_cannot_follow_fails_before_the_merge(tmp_path, tasks, models):
    spec = job(
        tmp_path,
        tasks,
        recipe_file(tmp_path, models),
        allowed_models=list(map(str, models.values())),
        mc_rule="letter",
        fewshot=2,
    )
    with pytest.raises(MergeArenaError, match="--fewshot 2, but the task has no few-shot"):
        run_job(spec)
    assert not (tmp_path / "out" / "model").exists()  # nothing was merged
    assert json.loads((tmp_path / "out" / "result.json").read_text())["status"] == "error"


# ------------------------------------------------------------------------------------ method API


@pytest.fixture
def unregister():
    from mergearena.methods import registry

    names: list[str] = []
    yield names.append
    for name in names:
        registry._REGISTRY.pop(name, None)


def test_method_api_file_submission(tmp_path, tasks, models, unregister):
    unregister("arena_test_mean")
    source = tmp_path / "submission.py"
    source.write_text(
        textwrap.dedent(f"""\
            import torch
            from mergearena.methods import merge_method

            @merge_method("arena_test_mean", reference="a test")
            def mean(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
                '''The base plus the mean of the task vectors.'''
                return base + torch.stack([t - base for t in tensors]).mean(0)

            RECIPE = {{
                "merge_method": "arena_test_mean",
                "base_model": {str(models["base"])!r},
                "models": [{{"model": {str(models["lora1"])!r}}},
                           {{"model": {str(models["lora2"])!r}}}],
            }}
            """)
    )
    result = run_job(job(tmp_path, tasks, source, kind="code", keep_model=True))
    assert result["method"] == "arena_test_mean" and len(result["models"]) == 3
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    assert set(read_predictions(tmp_path / "out" / "predictions" / "mc.csv")) == {"q1", "q2"}


def test_method_file_without_recipe_is_refused(tmp_path, tasks):
    source = tmp_path / "empty.py"
    source.write_text("x = 1\n")
    with pytest.raises(SubmissionError, match="needs a module-level RECIPE"):
        run_job(job(tmp_path, tasks, source, kind="code"))


# ------------------------------------------------------------------------------------ starter kit

MAIN_PY = """\
import argparse

from llm_merging.evaluation import *
from llm_merging.merging import *

def all_merge_handlers():
    loaded_merges = {
        "llama_avg": LlamaAvg,
        "my_avg": MyAvg,
    }
    return loaded_merges

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", "--merging_method", type=str, required=True)
"""

# The starter kit's LlamaAvg, on our tiny models: average two LoRA adapters into the base.
MY_AVG_PY = """\
import torch

from llm_merging.merging.Merges import Merges
from peft import get_peft_model, set_peft_model_state_dict

class MyAvg(Merges):
    def __init__(self, name):
        super().__init__(name)
        self.list_models = [({lora1!r}, None), ({lora2!r}, None)]
        self.base_model_name = {base!r}
        self.base_model_revision_id = None
        self.is_peft = True
        self.max_seq_len = None
        self.max_gen_len = 64
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.architecture = "decoder"
        self.loaded_models = {{}}
        self.loaded_configs = {{}}
        self.merged_model = {{}}

    def merge(self):
        super()._load_huggingface_models_and_configs()
        parameter_lambdas = [0.5, 0.5]
        all_models = list(self.loaded_models.values())
        for parameter_name in all_models[0].keys():
            merged_parameter = None
            for parameter_lambda, model in zip(parameter_lambdas, all_models):
                parameter = model[parameter_name]
                if merged_parameter is None:
                    merged_parameter = torch.clone(parameter) * parameter_lambda
                else:
                    merged_parameter += parameter * parameter_lambda
            self.merged_model[parameter_name] = merged_parameter
        self._load_base_model()
        self._load_tokenizer()
        huggingface_config = list(self.loaded_configs.values())[0]
        self.base_model = get_peft_model(self.base_model, huggingface_config)
        set_peft_model_state_dict(self.base_model, self.merged_model)
        self.base_model.eval()
        return self.base_model
"""


def write_starter_kit(root: Path, models: dict[str, Path], methods: str = "") -> Path:
    """The starter kit with MyAvg; ``methods`` (indented for the class body) are added to it."""
    package = root / "LLM-Merging" / "llm_merging"
    (package / "merging").mkdir(parents=True)
    (package / "main.py").write_text(MAIN_PY)
    (package / "merging" / "__init__.py").write_text(
        "from llm_merging.merging.LlamaAvg import LlamaAvg\n"
        "from llm_merging.merging.MyAvg import MyAvg\n"
    )
    (package / "merging" / "LlamaAvg.py").write_text(
        "from llm_merging.merging.Merges import Merges\n\nclass LlamaAvg(Merges):\n    pass\n"
    )
    (package / "merging" / "MyAvg.py").write_text(
        MY_AVG_PY.format(**{name: str(path) for name, path in models.items()})
        + textwrap.indent(textwrap.dedent(methods), "    ")
    )
    # The submission's own copy of the base class must lose to the compatibility layer's.
    (package / "merging" / "Merges.py").write_text("raise ImportError('not the arena Merges')\n")
    return root


@pytest.mark.slow
def test_starter_kit_submission_runs_unmodified_in_a_subprocess(tmp_path, tasks, models):
    submission = write_starter_kit(tmp_path / "submission", models)
    job_file = tmp_path / "job.json"
    job_file.write_text(
        json.dumps(
            job(
                tmp_path,
                tasks,
                submission,
                kind="code",
                keep_model=True,
                allowed_models=[str(path) for path in models.values()],
            )
        )
    )
    process = subprocess.run(
        [sys.executable, "-m", "mergearena.arena.runner", str(job_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr
    out = tmp_path / "out"
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["method"] == "my_avg"  # not the kit's example
    assert result["models"] == [str(models[k]) for k in ("base", "lora1", "lora2")]
    assert set(read_predictions(out / "predictions" / "mc.csv")) == {"q1", "q2"}
    assert set(read_predictions(out / "predictions" / "gen.csv")) == {"s1", "s2"}

    # The saved model is the base plus the LoRA of the averaged A and B factors (scale 8 / 4).
    merged = load_file(out / "model" / "model.safetensors")
    base = load_file(models["base"] / "model.safetensors")
    loras = [load_file(models[k] / "adapter_model.safetensors") for k in ("lora1", "lora2")]
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    down = sum(lora[f"{prefix}.lora_A.weight"] for lora in loras) / 2
    up = sum(lora[f"{prefix}.lora_B.weight"] for lora in loras) / 2
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[name], base[name] + 2.0 * up @ down)
    assert (out / "model" / "tokenizer.json").is_file()


def test_starter_kit_method_choice(tmp_path):
    from llm_merging.submission import choose_method, find_package

    package = find_package(write_starter_kit(tmp_path, {"base": "b", "lora1": "x", "lora2": "y"}))
    assert choose_method(package, None) == ("my_avg", "MyAvg", "MyAvg")  # the kit's example skipped
    assert choose_method(package, "LlamaAvg")[0] == "llama_avg"  # a class name works too
    with pytest.raises(SubmissionError, match="no merge method 'ties'; it has: llama_avg, my_avg"):
        choose_method(package, "ties")
    main_py = package / "main.py"
    main_py.write_text(main_py.read_text().replace("required=True", 'default="llama_avg"'))
    assert choose_method(package, None)[0] == "llama_avg"
    with pytest.raises(SubmissionError, match="expected llm_merging/merging"):
        find_package(tmp_path / "LLM-Merging" / "llm_merging")


def test_starter_kit_modules_load_behind_ours_and_are_forgotten(tmp_path):
    import llm_merging.merging
    from llm_merging import resolution, submission
    from llm_merging.merging.Merges import Merges

    package = submission.find_package(
        write_starter_kit(tmp_path, {"base": "b", "lora1": "x", "lora2": "y"})
    )
    path = list(llm_merging.merging.__path__)
    policy = ModelPolicy(["b"])
    with submission.installed(package, policy):
        name, method_class = submission.load_method(package)
        assert resolution.policy is policy and issubclass(method_class, Merges)
        assert method_class.__module__ == "llm_merging.merging.MyAvg"
    assert "llm_merging.merging.MyAvg" not in sys.modules
    assert list(llm_merging.merging.__path__) == path and resolution.policy is not policy


def test_compat_layer_refuses_an_unlisted_model(models, monkeypatch):
    from llm_merging import resolution
    from llm_merging.merging.Merges import Merges

    class Avg(Merges):
        def __init__(self, name):
            super().__init__(name)
            self.list_models = [(str(models["lora1"]), None), ("org/unlisted", "abc")]
            self.base_model_name = str(models["base"])
            self.architecture = "decoder"

    monkeypatch.setattr(
        resolution, "policy", ModelPolicy([str(models["base"]), str(models["lora1"])])
    )
    method = Avg("avg")
    with pytest.raises(SubmissionError, match="'org/unlisted@abc' is not allowed.*allowed models"):
        method._load_huggingface_models_and_configs()
    assert list(method.loaded_models) == [str(models["lora1"])]  # loaded as the starter kit does
    assert set(method.loaded_configs[str(models["lora1"])].target_modules) == {"q_proj", "v_proj"}


def test_compat_prediction_hooks(models, monkeypatch):
    from llm_merging import resolution
    from llm_merging.merging.Merges import Merges

    monkeypatch.setattr(resolution, "policy", ModelPolicy())
    method = Merges("plain")
    method.base_model_name = str(models["base"])
    method.architecture, method.max_gen_len = "decoder", 2
    method._load_base_model()
    method._load_tokenizer()
    assert method.target_tokenizer.add_eos_token and method.input_tokenizer.padding_side == "left"
    choices = ["['a way', 'no the']", ["up it", "the day"]]  # a list literal, as the CSV has it
    batch = {"input": ["he was", "the water"], "answer_choices": choices}
    predicted, scores = method.predict_multiple_choice(batch)
    assert predicted.shape == (2,) and scores.shape == (2, 2)
    assert predicted.tolist() == scores.argmax(1).tolist()
    ids, texts = method.generate(batch)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts) and len(ids) == 2


def test_compat_multiple_choice_fails_only_where_the_kit_fails_on_the_batch(models, monkeypatch):
    from llm_merging import resolution
    from llm_merging.merging.Merges import Merges
    from mergearena.errors import EvaluationError
    from mergearena.evaluation import StarterKitWarning

    monkeypatch.setattr(resolution, "policy", ModelPolicy())
    method = Merges("plain")
    method.base_model_name, method.architecture = str(models["base"]), "decoder"
    method._load_base_model()
    # The tiny tokenizer appends no EOS: "yes" and "no" are one token each, nothing to score.
    alone = {"id": ["q1"], "input": ["he was"], "answer_choices": ["['yes', 'no']"]}
    with pytest.raises(EvaluationError, match="one token long in 1 row\\(s\\): 'q1'"):
        method.predict_multiple_choice(alone)  # as the kit's reshape fails on this batch
    # The kit scores a batch at once: beside a row with tokens to score, q1 scores 0.0, no error.
    batch = {
        "id": ["q1", "q2"],
        "input": ["he was", "the water"],
        "answer_choices": ["['yes', 'no']", "['a way', 'no']"],
    }
    with pytest.warns(StarterKitWarning, match="'q1', 'q2'"):
        predicted, scores = method.predict_multiple_choice(batch)
    assert predicted.tolist()[0] == 0 and scores[0].tolist() == [0.0, 0.0]


# ------------------------------------------------------------------- the submission's own inference

MC_TARGETS = {"q1": 1, "q2": 0}  # one of the two targets is the first choice
GEN_TARGETS = {"s1": "the people of the water", "s2": "it is the way"}


def hidden_tasks(tmp_path: Path) -> dict[str, Task]:
    """The task files with their targets, as only the worker holds them."""
    folder = tmp_path / "hidden"
    folder.mkdir()
    found = {}
    for name, rows, targets in (("mc", MC_ROWS, MC_TARGETS), ("gen", GEN_ROWS, GEN_TARGETS)):
        with (folder / f"{name}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("id", "input", "target", "answer_choices", "eval_type"))
            writer.writerows(
                (i, text, targets[i], choices, kind) for i, text, choices, kind in rows
            )
        found[name] = load_task(folder / f"{name}.csv")
    return found


def score(tmp_path: Path, task: Task) -> float:
    """The worker's score of what the run wrote."""
    predictions = tmp_path / "out" / "predictions" / f"{task.name}.csv"
    return score_task(task, predictions, root=tmp_path).value


def kit_job(tmp_path: Path, tasks: list[str], models: dict[str, Path], methods: str) -> dict:
    submission = write_starter_kit(tmp_path / "submission", models, methods)
    allowed = [str(path) for path in models.values()]
    return job(tmp_path, tasks, submission, kind="code", allowed_models=allowed)


FIRST_CHOICE = """\
    def predict_multiple_choice(self, batch):
        import ast

        print("MC BATCH:", batch)
        choices = [ast.literal_eval(text) for text in batch["answer_choices"]]  # as the kit does
        assert all(len(c) >= 2 for c in choices) and self.base_model is not None
        return torch.zeros(len(batch["input"]), dtype=torch.long), None
"""

CONSTANT_TEXT = """\
    def generate(self, batch):
        print("GEN BATCH:", batch)
        return None, ["the people"] * len(batch["input"])
"""


def test_kit_predict_multiple_choice_override_answering_the_first_choice(
    tmp_path, tasks, models, capsys
):
    result = run_job(kit_job(tmp_path, tasks, models, FIRST_CHOICE))

    assert result["own_inference"] == ["MyAvg.predict_multiple_choice"]
    first_batch = {
        "id": ["q1"],
        "input": ["the water is on the long way"],
        "answer_choices": ["['a way', 'the people', 'no']"],
        "eval_type": ["multiple_choice"],
    }
    assert f"MC BATCH: {first_batch!r}" in capsys.readouterr().out  # the kit's batch, no target
    predictions = tmp_path / "out" / "predictions"
    assert read_predictions(predictions / "mc.csv") == {"q1": "0", "q2": "0"}
    assert result["tasks"]["mc"]["own_predictions"] == 2 and result["tasks"]["mc"]["n"] == 2
    # generate is not overridden: mergearena's scorer predicts those rows
    assert list(read_predictions(predictions / "gen.csv")) == ["s1", "s2"]
    assert "own_predictions" not in result["tasks"]["gen"]

    hidden = hidden_tasks(tmp_path)["mc"]
    first_choice_share = statistics.fmean(e.target == 0 for e in hidden.examples)
    assert score(tmp_path, hidden) == first_choice_share == 0.5


def test_kit_generate_override_is_scored_on_its_constant_text(tmp_path, tasks, models, capsys):
    result = run_job(kit_job(tmp_path, tasks, models, CONSTANT_TEXT))

    assert result["own_inference"] == ["MyAvg.generate"]
    first_batch = {"id": ["s1"], "input": ["the people of the water"], "eval_type": ["generation"]}
    assert f"GEN BATCH: {first_batch!r}" in capsys.readouterr().out
    predictions = tmp_path / "out" / "predictions"
    assert read_predictions(predictions / "gen.csv") == {"s1": "the people", "s2": "the people"}
    assert set(read_predictions(predictions / "mc.csv")) == {"q1", "q2"}  # mergearena's scorer

    expected = statistics.fmean(
        generation_metrics("the people", target)["rougeL"] for target in GEN_TARGETS.values()
    )
    assert 0 < expected < 1
    assert score(tmp_path, hidden_tasks(tmp_path)["gen"]) == pytest.approx(expected)


def test_kit_override_that_raises_fails_with_its_traceback(tmp_path, tasks, models, capsys):
    raises = """\
        def predict_multiple_choice(self, batch):
            raise ValueError("boom in " + batch["id"][0])
    """
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(kit_job(tmp_path, tasks, models, raises)))

    assert main([str(job_file)]) == 2
    error = capsys.readouterr().err
    assert "Traceback" in error and 'raise ValueError("boom in " + batch["id"][0])' in error
    message = "task mc, row id 'q1': MyAvg.predict_multiple_choice raised ValueError: boom in q1"
    assert f"error: {message}" in error
    out = tmp_path / "out"
    assert not (out / "predictions").exists()
    assert message in json.loads((out / "result.json").read_text())["error"]


def test_kit_overrides_are_found_by_class():
    from llm_merging.merging.Merges import Merges

    class Plain(Merges):
        def merge(self):
            return None

    class Own(Merges):
        def generate(self, batch):
            return None, ["text"]

    class Heir(Own):
        pass

    assert starter_kit_hooks(Plain("plain")).by_type == {}
    hooks = starter_kit_hooks(Heir("heir"))
    assert list(hooks.by_type) == ["generation"] and hooks.label("generation") == "Heir.generate"
    assert hooks.by_type["generation"]({"input": ["x"]}) == (None, ["text"])


MC_EXAMPLE = [Example("q1", "x", "multiple_choice", ("a", "b", "c"))]
GEN_EXAMPLE = [Example("g1", "x", "generation")]


@pytest.mark.parametrize(
    ("returned", "problem"),
    [
        (torch.tensor([0]), "must return (predicted_choice, answer_choice_scores)"),
        ((torch.tensor([[0]]), None), "predicted_choice has shape (1, 1); it must have shape (1,)"),
        ((torch.tensor(0), None), "predicted_choice has shape (); it must have shape (1,)"),
        ((torch.tensor([0, 1]), None), "has shape (2,)"),  # an extra prediction
        (([], None), "returned 0 predicted choice(s) for a batch of 1"),  # a missing one
        (([0, 1], None), "returned 2 predicted choice(s) for a batch of 1"),
        (({"q1": 0}, None), "must be a tensor, array or list"),
        (([3], None), "predicted choice 3, out of range for its 3 choices (0 to 2)"),
        (([-1], None), "predicted choice -1, out of range"),
        ((torch.tensor([1.0]), None), "predicted 1.0 (float), not a choice index"),
        ((["1"], None), "predicted '1' (str), not a choice index"),
        (([True], None), "predicted True (bool), not a choice index"),
    ],
)
def test_broken_multiple_choice_output_is_refused_naming_task_and_row(returned, problem):
    with pytest.raises(SubmissionError) as caught:
        check_choices(returned, MC_EXAMPLE, task="mc", label="MyAvg.predict_multiple_choice")
    message = str(caught.value)
    assert message.startswith("task mc, row id 'q1': MyAvg.predict_multiple_choice") and (
        problem in message
    ), message


@pytest.mark.parametrize(
    ("returned", "problem"),
    [
        (["just text"], "must return (generated_ids, generated_texts)"),
        ((None, "text"), "generated_texts must be a list of one str per example"),
        ((None, []), "returned 0 generated text(s) for a batch of 1"),
        ((None, ["a", "b"]), "returned 2 generated text(s) for a batch of 1"),
        ((None, [None]), "generated None (NoneType), not text (a str)"),
        ((None, [b"bytes"]), "generated b'bytes' (bytes), not text"),
        ((None, [["tokens"]]), "generated ['tokens'] (list), not text"),
        ((None, ["\ud800"]), "generated text that is not valid Unicode"),
    ],
)
def test_broken_generation_output_is_refused_naming_task_and_row(returned, problem):
    with pytest.raises(SubmissionError) as caught:
        check_texts(returned, GEN_EXAMPLE, task="gen", label="MyAvg.generate")
    message = str(caught.value)
    assert message.startswith("task gen, row id 'g1': MyAvg.generate") and problem in message


def test_valid_outputs_in_the_kits_forms_are_accepted():
    import numpy

    label = {"task": "mc", "label": "hook"}
    assert check_choices((torch.tensor([2]), torch.zeros(1, 3)), MC_EXAMPLE, **label) == ["2"]
    assert check_choices([numpy.array([1]), None], MC_EXAMPLE, **label) == ["1"]
    assert check_choices(([numpy.int64(0)], None), MC_EXAMPLE, **label) == ["0"]
    assert check_texts(([[1, 2]], ("a text",)), GEN_EXAMPLE, **label) == ["a text"]


def method_file_with_hooks(tmp_path: Path, models: dict[str, Path], hooks: str) -> Path:
    source = tmp_path / "submission.py"
    model = {"model": str(models["base"]), "parameters": {"weight": 1.0}}
    recipe = {"merge_method": "linear", "models": [model]}
    source.write_text(f"RECIPE = {recipe!r}\n\n" + textwrap.dedent(hooks))
    return source


def test_single_file_submission_predicts_with_its_hooks(tmp_path, tasks, models, capsys):
    source = method_file_with_hooks(
        tmp_path,
        models,
        """\
        import ast

        from mergearena.evaluation import generate  # imported, not defined here: not a hook


        def predict_multiple_choice(model, tokenizer, batch):
            dtype = next(model.parameters()).dtype
            print("HOOK GOT", type(model).__name__, dtype, model.training, tokenizer.pad_token)
            last = [len(ast.literal_eval(text)) - 1 for text in batch["answer_choices"]]
            return last, None
        """,
    )
    result = run_job(job(tmp_path, tasks, source, kind="code"))

    assert result["own_inference"] == ["submission.predict_multiple_choice"]
    predictions = tmp_path / "out" / "predictions"
    assert read_predictions(predictions / "mc.csv") == {"q1": "2", "q2": "1"}
    assert "HOOK GOT LlamaForCausalLM torch.float32 False <pad>" in capsys.readouterr().out
    assert list(read_predictions(predictions / "gen.csv")) == ["s1", "s2"]  # mergearena's


def test_single_file_hook_output_out_of_range_fails_naming_task_and_row(tmp_path, tasks, models):
    source = method_file_with_hooks(
        tmp_path,
        models,
        """\
        def predict_multiple_choice(model, tokenizer, batch):
            return [5], None
        """,
    )
    with pytest.raises(SubmissionError) as caught:
        run_job(job(tmp_path, tasks, source, kind="code"))
    assert str(caught.value) == (
        "task mc, row id 'q1': submission.predict_multiple_choice: predicted choice 5, "
        "out of range for its 3 choices (0 to 2)"
    )
    assert not (tmp_path / "out" / "predictions").exists()


def test_single_file_hook_with_a_wrong_signature_is_refused_before_merging(tmp_path, tasks, models):
    source = method_file_with_hooks(tmp_path, models, "def generate(batch):\n    return None\n")
    with pytest.raises(SubmissionError, match=r"generate must be a function of \(model, tok"):
        run_job(job(tmp_path, tasks, source, kind="code"))
    assert not (tmp_path / "out" / "model").exists()


def test_the_sandbox_mounts_each_admitted_model_that_exists_and_nothing_beside_it(
    tmp_path, models, monkeypatch
):
    """The allowlist expanded to directories, each mounted on its own: patterns match the zoo
    models and hub models there are; a full-weight expert keeps its adapter's config (how the
    zoo knows its name) without the adapter; the folder of committed experts is emptied under
    them. An empty allowlist admits any model: the whole zoo and hub cache."""
    from mergearena.arena.policy import model_mounts
    from mergearena.checkpoints.refs import ZOO_EXPERTS_DIR

    cache, hub = tmp_path / "cache", tmp_path / "hub"
    monkeypatch.setenv("MERGEARENA_CACHE", str(cache))
    for name in ("smollm2-135m", "sentiment", "spam"):
        (cache / "zoo" / name).mkdir(parents=True)
    for repo in ("org--a", "org--b", "other--c"):
        (hub / f"models--{repo}").mkdir(parents=True)
    allowed = [
        "zoo:sentiment",
        "zoo:subject-lora",
        "zoo:smollm2-*",
        "org/*",
        f"{models['base']}+{models['lora1']}",
        str(tmp_path / "missing"),
    ]
    mounts = model_mounts(allowed, hub)
    assert set(mounts.readonly) == {
        cache / "zoo" / "sentiment",
        cache / "zoo" / "smollm2-135m",
        ZOO_EXPERTS_DIR / "sentiment" / "adapter_config.json",
        ZOO_EXPERTS_DIR / "subject",
        hub / "models--org--a",
        hub / "models--org--b",
        models["base"],
        models["lora1"],
    }
    assert mounts.hidden == (ZOO_EXPERTS_DIR,)
    everything = model_mounts([], hub)
    assert hub in everything.readonly and cache / "zoo" / "spam" in everything.readonly
    assert ZOO_EXPERTS_DIR / "spam" in everything.readonly and everything.hidden == ()
