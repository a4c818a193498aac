"""The arena runner (the sandboxed entry point) and the starter-kit compatibility layer."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergearena.arena.runner import (
    JobSpec,
    ModelPolicy,
    SubmissionError,
    count_parameters,
    main,
    run_job,
)
from mergearena.errors import MergeArenaError

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
    with pytest.raises(MergeArenaError, match="kind.*'recipe' or 'code'.*tasks"):
        run_job({"kind": "zip", "submission": "x", "tasks": [], "out": "o"})


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


def write_starter_kit(root: Path, models: dict[str, Path]) -> Path:
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
    from llm_merging import submission
    from llm_merging.merging.Merges import Merges

    package = submission.find_package(
        write_starter_kit(tmp_path, {"base": "b", "lora1": "x", "lora2": "y"})
    )
    path = list(llm_merging.merging.__path__)
    policy = ModelPolicy(["b"])
    with submission.installed(package, policy):
        name, method_class = submission.load_method(package)
        assert submission.policy is policy and issubclass(method_class, Merges)
        assert method_class.__module__ == "llm_merging.merging.MyAvg"
    assert "llm_merging.merging.MyAvg" not in sys.modules
    assert list(llm_merging.merging.__path__) == path and submission.policy is not policy


def test_compat_layer_refuses_an_unlisted_model(models, monkeypatch):
    from llm_merging import submission
    from llm_merging.merging.Merges import Merges

    class Avg(Merges):
        def __init__(self, name):
            super().__init__(name)
            self.list_models = [(str(models["lora1"]), None), ("org/unlisted", "abc")]
            self.base_model_name = str(models["base"])
            self.architecture = "decoder"

    monkeypatch.setattr(
        submission, "policy", ModelPolicy([str(models["base"]), str(models["lora1"])])
    )
    method = Avg("avg")
    with pytest.raises(SubmissionError, match="'org/unlisted@abc' is not allowed.*allowed models"):
        method._load_huggingface_models_and_configs()
    assert list(method.loaded_models) == [str(models["lora1"])]  # loaded as the starter kit does
    assert set(method.loaded_configs[str(models["lora1"])].target_modules) == {"q_proj", "v_proj"}


def test_compat_prediction_hooks(models, monkeypatch):
    from llm_merging import submission
    from llm_merging.merging.Merges import Merges

    monkeypatch.setattr(submission, "policy", ModelPolicy())
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
