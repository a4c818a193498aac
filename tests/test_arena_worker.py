"""Real submissions end to end: queued in a SQLite file, claimed by a worker, run by the runner in
the sandbox, scored against hidden targets. Tiny random models; no zoo, no downloads."""

from __future__ import annotations

import io
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

from mergearena.arena import queue, service
from mergearena.arena.db import Submission, open_database
from mergearena.arena.sandbox import sandbox_available
from mergearena.arena.worker import WorkerSettings, work_once

pytestmark = pytest.mark.slow
needs_sandbox = pytest.mark.skipif(
    sandbox_available() is not None, reason=f"no sandbox here: {sandbox_available()}"
)

MC = (
    "id,input,target,answer_choices,eval_type\n"
    "q1,Is the sky blue?,0,\"['yes', 'no']\",multiple_choice\n"
    "q2,Is fire cold?,1,\"['yes', 'no']\",multiple_choice\n"
)
GEN = "id,input,target,answer_choices,eval_type\ng1,Say hi,hi,,generation\n"


@pytest.fixture()
def models(make_checkpoint, make_lora) -> dict[str, Path]:
    base = make_checkpoint("llama", seed=0, name="base")
    found = {"base": base, "lora1": make_lora(base, seed=1), "lora2": make_lora(base, seed=2)}
    for directory in found.values():  # the sandbox user reads them (save_file writes 0600)
        for path in directory.iterdir():
            path.chmod(0o644)
    return found


@pytest.fixture()
def arena(tmp_path: Path, models):
    data_dir = tmp_path / "data"
    sessions = open_database(f"sqlite:///{tmp_path / 'arena.db'}")
    with sessions() as session:
        competition = service.create_competition(
            session,
            service.CompetitionSpec(
                slug="tiny",
                name="Tiny",
                allowed_models=[str(p) for p in models.values()],
                time_limit_seconds=120,
                memory_limit_bytes=None,
                daily_submissions=100,
            ),
        )
        phase = service.add_phase(session, competition, "validation", "validation")
        service.add_task(session, data_dir, phase, "mc", MC.encode())
        service.add_task(session, data_dir, phase, "gen", GEN.encode(), {"max_new_tokens": 4})
        team, _ = service.register_team(session, "alpha")
        session.commit()
    settings = WorkerSettings(data_dir=data_dir, dtype="float32", scratch_dir=tmp_path / "jobs")

    def submit(file_name: str, content: bytes, *, time_limit: int | None = None) -> int:
        with sessions() as session:
            phase = service.get_phase(service.get_competition(session, "tiny"))
            if time_limit is not None:
                phase.competition.time_limit_seconds = time_limit
            team = session.query(service.Team).one()
            submission = service.submit(
                session, data_dir, team, phase, file_name, file_name, content
            )
            session.commit()
            return submission.id

    def run() -> Submission:
        done = work_once(sessions, settings)
        assert done is not None
        return done

    return submit, run, sessions, data_dir


def _recipe(models) -> bytes:
    return textwrap.dedent(f"""\
        merge_method: task_arithmetic
        base_model: {models["base"]}
        models:
          - model: {models["lora1"]}
          - model: {models["lora2"]}
        parameters: {{lambda: 0.5, weight: 1.0}}
        """).encode()


def test_a_recipe_is_merged_predicted_and_scored(arena, models) -> None:
    submit, run, _, _ = arena
    submission_id = submit("recipe.yaml", _recipe(models))
    done = run()
    assert done.id == submission_id
    assert done.status == "scored", done.log
    assert set(done.scores) == {"mc", "gen"}
    assert all(0.0 <= v <= 1.0 for v in done.scores.values())
    assert done.average == pytest.approx(sum(done.scores.values()) / 2)
    assert done.attempts == 1 and done.finished_at is not None


def test_a_job_whose_worker_died_is_run_again_by_another(arena, models) -> None:
    submit, run, sessions, _ = arena
    submission_id = submit("recipe.yaml", _recipe(models))
    with sessions() as session:  # a worker claims it and dies: its lease runs out
        assert queue.claim(session, "died", lease_seconds=-1).id == submission_id
    done = run()
    assert done.status == "scored" and done.attempts == 2


def _starter_kit_tarball(models) -> bytes:
    method = textwrap.dedent(f"""\
        import torch
        from llm_merging.merging.Merges import Merges
        from peft import get_peft_model, set_peft_model_state_dict


        class MyAvg(Merges):
            def __init__(self, name):
                super().__init__(name)
                self.list_models = [({str(models["lora1"])!r}, "main"),
                                    ({str(models["lora2"])!r}, "main")]
                self.base_model_name = {str(models["base"])!r}
                self.base_model_revision_id = "main"
                self.is_peft = True
                self.max_seq_len = None
                self.max_gen_len = 8
                self.architecture = "decoder"
                self.loaded_models = {{}}
                self.loaded_configs = {{}}
                self.merged_model = {{}}

            def merge(self):
                super()._load_huggingface_models_and_configs()
                all_models = list(self.loaded_models.values())
                for name in all_models[0]:
                    self.merged_model[name] = torch.stack([m[name] for m in all_models]).mean(0)
                super()._load_base_model()
                config = list(self.loaded_configs.values())[0]
                self.base_model = get_peft_model(self.base_model, config)
                set_peft_model_state_dict(self.base_model, self.merged_model)
                self.base_model = self.base_model.merge_and_unload()
                return self.base_model
        """)
    files = {
        "LLM-Merging/llm_merging/__init__.py": "",
        "LLM-Merging/llm_merging/merging/__init__.py": "from .MyAvg import MyAvg\n",
        "LLM-Merging/llm_merging/merging/MyAvg.py": method,
        "LLM-Merging/llm_merging/main.py": (
            "from llm_merging.merging import *\n\n"
            "def all_merge_handlers():\n    return {'my_avg': MyAvg}\n"
        ),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@needs_sandbox
def test_a_starter_kit_tarball_runs_unmodified_in_the_sandbox(arena, models) -> None:
    submit, run, _, _ = arena
    submit("LLM-Merging.tar.gz", _starter_kit_tarball(models))
    done = run()
    assert done.status == "scored", done.log
    assert set(done.scores) == {"mc", "gen"}


def _method_file(models, prelude: str) -> bytes:
    """A single-file submission (mergearena's method API) that runs ``prelude`` at import."""
    return (
        textwrap.dedent(prelude)
        + textwrap.dedent(f"""
        RECIPE = {{
            "merge_method": "linear",
            "models": [{{"model": {str(models["base"])!r}, "parameters": {{"weight": 1.0}}}}],
        }}
        """)
    ).encode()


@needs_sandbox
def test_code_cannot_read_hidden_targets_or_reach_the_network(arena, models) -> None:
    submit, run, sessions, data_dir = arena
    with sessions() as session:
        task = service.get_competition(session, "tiny").phases[0].tasks[0]
        targets = service.blob_path(data_dir, task.full_sha256)
    prelude = f"""\
        import os, socket
        try:
            open({str(targets)!r}).read()
            print("TARGETS: READ")
        except OSError as error:
            print("TARGETS: hidden", type(error).__name__)
        print("DATA DIR HOLDS:", os.listdir({str(data_dir)!r}))
        try:
            socket.create_connection(("1.1.1.1", 53), timeout=2)
            print("NETWORK: OPEN")
        except OSError as error:
            print("NETWORK: refused", type(error).__name__)
        """
    submit("probe.py", _method_file(models, prelude))
    done = run()
    assert done.status == "scored", (done.error, done.log)
    assert "TARGETS: hidden" in done.log and "NETWORK: refused" in done.log, done.log
    assert "DATA DIR HOLDS: []" in done.log, done.log
    assert done.status == "scored", done.log


@needs_sandbox
def test_a_submission_past_the_time_limit_is_stopped(arena, models) -> None:
    submit, run, _, _ = arena
    prelude = "import time\nprint('about to sleep')\ntime.sleep(600)\n"
    # 20 s: the runner imports torch before the submission, which can take a while when busy
    submit("slow.py", _method_file(models, prelude), time_limit=20)
    done = run()
    assert done.status == "timed_out" and "time limit of 20 s" in done.error
    assert "about to sleep" in done.log  # what it printed before it was killed


@needs_sandbox
def test_a_crashing_submission_fails_with_its_log(arena, models) -> None:
    submit, run, _, _ = arena
    submit("crash.py", _method_file(models, "raise ValueError('boom from the submission')\n"))
    done = run()
    assert done.status == "failed"
    assert "boom from the submission" in done.log


@needs_sandbox
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_worker_runs_the_submission_on_the_gpu_in_the_sandbox(arena, models) -> None:
    submit, _, sessions, data_dir = arena
    prelude = "import torch\nprint('CUDA INSIDE:', torch.cuda.is_available())\n"
    submit("gpu.py", _method_file(models, prelude))
    settings = WorkerSettings(data_dir=data_dir, device="cuda", dtype="float32")
    done = work_once(sessions, settings)
    assert done.status == "scored", done.log
    assert "CUDA INSIDE: True" in done.log


def test_the_worker_command_processes_the_queue(arena, models, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mergearena.cli import app

    submit, _, sessions, data_dir = arena
    submission_id = submit("recipe.yaml", _recipe(models))
    database = f"sqlite:///{tmp_path / 'arena.db'}"
    args = ["worker", "--db", database, "--data-dir", str(data_dir), "--until-empty"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"submission {submission_id} (alpha / recipe.yaml): scored" in result.output
    assert "processed 1 submission(s)" in result.output
