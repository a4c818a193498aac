"""Real submissions end to end: queued in a SQLite file, claimed by a worker, run by the runner in
the sandbox, scored against hidden targets. Tiny random models and no downloads; one test (marked
``zoo``) uses the prepared zoo's base model."""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import BOTH_DATABASES, empty_database

from mergearena.arena import queue, service
from mergearena.arena.db import Submission, open_database
from mergearena.arena.sandbox import sandbox_available
from mergearena.arena.worker import WorkerSettings, work_once
from mergearena.evaluation.metrics import generation_metrics

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
def database_url(request, tmp_path: Path) -> str:
    """SQLite, unless a test asks for PostgreSQL too (``BOTH_DATABASES``, indirectly)."""
    return empty_database(getattr(request, "param", "sqlite"), tmp_path)


@pytest.fixture()
def arena(tmp_path: Path, models, database_url: str):
    data_dir = tmp_path / "data"
    sessions = open_database(database_url)
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
    # what the run cost: measured by the worker, and as the run reported it
    from mergearena.arena.policy import count_parameters

    costs = done.costs
    assert 0 < costs["merge_seconds"] < costs["seconds"] and costs["gpu_seconds"] == 0.0
    assert costs["peak_rss_bytes"] > 100 * 2**20  # the runner's Python with torch loaded
    assert costs["parameters"] == count_parameters(models["base"])
    assert costs["peak_gpu_bytes"] is None


def test_a_chain_of_thought_competition_is_scored_with_its_misses_counted_wrong(
    arena, models
) -> None:
    submit, run, sessions, _ = arena
    with sessions() as session:
        competition = service.get_competition(session, "tiny")
        competition.mc_rule, competition.fewshot = "cot", 1
        competition.cot = {"max_new_tokens": 2, "fallbacks": []}
        session.commit()
    submit("recipe.yaml", _recipe(models))
    done = run()
    # Two tokens of the tiny vocabulary hold no answer letter: each row predicts -1, a miss the
    # scorer counts wrong rather than refusing the predictions file.
    assert done.status == "scored", done.log
    assert done.scores["mc"] == 0.0


def test_a_job_whose_worker_died_is_run_again_by_another(arena, models) -> None:
    submit, run, sessions, _ = arena
    submission_id = submit("recipe.yaml", _recipe(models))
    with sessions() as session:  # a worker claims it and dies: its lease runs out
        assert queue.claim(session, "died", lease_seconds=-1).id == submission_id
    done = run()
    assert done.status == "scored" and done.attempts == 2


def test_a_model_plus_adapter_recipe_passes_the_allowlist_and_is_scored(arena, models) -> None:
    """mergekit's documented ``BASE+ADAPTER`` form, each half on the allowlist (not the pair)."""
    submit, run, _, _ = arena
    recipe = textwrap.dedent(f"""\
        merge_method: linear
        models:
          - model: {models["base"]}+{models["lora1"]}
          - model: {models["base"]}+{models["lora2"]}
        parameters: {{weight: 0.5}}
        """).encode()
    submit("recipe.yaml", recipe)
    done = run()
    assert done.status == "scored", (done.error, done.log)
    assert set(done.scores) == {"mc", "gen"}
    used = ", ".join(str(models[name]) for name in ("base", "lora1", "lora2"))
    assert "merged with linear in" in done.log and used in done.log, done.log


def _starter_kit_tarball(models, methods: str = "") -> bytes:
    """The starter kit with a MyAvg method; ``methods`` (at class-body indent) are added to it."""
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
        """) + textwrap.indent(textwrap.dedent(methods), "    ")
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
    # the log opens with the guards and limits the run was held to, and ends with how it ended
    guards, limits, cgroups = done.log.splitlines()[:3]
    assert guards.startswith("seccomp filter: in force"), done.log
    assert limits.startswith("limits: wall 120 s for the run; per process (rlimits)"), done.log
    assert cgroups.startswith(("cgroup v2: memory.max", "no cgroup limits")), done.log
    assert done.log.splitlines()[-1].startswith("the run exited with code 0"), done.log


def _tarball(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def full_weight_starter_kit(base: str, experts: list[str]) -> bytes:
    """A starter-kit tarball, in the kit's own layout, whose method averages full-weight models
    (``("zoo:sentiment", None)``, ...) and loads the average into ``base``."""
    method = textwrap.dedent(f"""\
        from llm_merging.merging.Merges import Merges


        class FullAvg(Merges):
            def __init__(self, name):
                super().__init__(name)
                self.list_models = {[(expert, None) for expert in experts]!r}
                self.base_model_name = {base!r}
                self.base_model_revision_id = None
                self.is_peft = False
                self.max_seq_len = None
                self.max_gen_len = 4
                self.architecture = "decoder"
                self.loaded_models = {{}}
                self.loaded_configs = {{}}
                self.merged_model = {{}}

            def merge(self):
                super()._load_huggingface_models_and_configs()
                states = list(self.loaded_models.values())
                for name in states[0]:
                    self.merged_model[name] = sum(s[name] for s in states) / len(states)
                super()._load_base_model()
                self.base_model.load_state_dict(self.merged_model)
                return self.base_model
        """)
    return _tarball(
        {
            "LLM-Merging/llm_merging/__init__.py": "",
            "LLM-Merging/llm_merging/merging/__init__.py": "from .FullAvg import FullAvg\n",
            "LLM-Merging/llm_merging/merging/FullAvg.py": method,
            "LLM-Merging/llm_merging/main.py": (
                "from llm_merging.merging import *\n\n"
                "def all_merge_handlers():\n    return {'full_avg': FullAvg}\n"
            ),
        }
    )


@needs_sandbox
def test_a_job_asking_for_an_unbuilt_zoo_model_fails_with_a_clear_message(
    arena, models, tmp_path: Path, monkeypatch
) -> None:
    """Nothing builds inside the sandbox (the cache is read-only there); the worker builds
    nothing without a prepared zoo base: the team's log says what is missing, no traceback."""
    submit, run, sessions, _ = arena
    monkeypatch.setenv("MERGEARENA_CACHE", str(tmp_path / "fresh-cache"))
    with sessions() as session:
        competition = service.get_competition(session, "tiny")
        competition.allowed_models = [*competition.allowed_models, "zoo:*"]
        session.commit()
    submit("LLM-Merging.tar.gz", full_weight_starter_kit(str(models["base"]), ["zoo:sentiment"]))
    done = run()
    assert done.status == "failed", done.log
    assert "zoo:sentiment, the sentiment expert with full weights, is not built" in done.log
    assert "mergearena zoo prepare" in done.log and "Traceback" not in done.log, done.log
    assert not (tmp_path / "fresh-cache").exists()


@needs_sandbox
@pytest.mark.zoo
def test_full_weight_zoo_experts_are_built_by_the_worker_on_a_fresh_cache(
    arena, tmp_path: Path, monkeypatch
) -> None:
    """A starter-kit tarball listing the zoo's full-weight experts, on a fresh arena and cache:
    the worker builds what the competition admits before the run, outside the sandbox."""
    import os
    import shutil

    from mergearena.checkpoints.refs import (
        ZOO_BASE_NAME,
        resolve_model_ref,
        zoo_model_dir,
        zoo_model_problem,
    )
    from mergearena.errors import CheckpointError

    prepared = zoo_model_dir(ZOO_BASE_NAME)
    if zoo_model_problem(prepared) is not None:
        pytest.skip("the zoo is not prepared: run `mergearena zoo prepare`")
    cache = tmp_path / "cache"
    shutil.copytree(prepared, cache / "zoo" / ZOO_BASE_NAME, copy_function=os.link)
    monkeypatch.setenv("MERGEARENA_CACHE", str(cache))
    with pytest.raises(CheckpointError, match="zoo:sentiment, .* is not built"):
        resolve_model_ref("zoo:sentiment")  # a lookup builds nothing
    assert [p.name for p in (cache / "zoo").iterdir()] == [ZOO_BASE_NAME]

    submit, run, sessions, _ = arena
    allowed = [f"zoo:{ZOO_BASE_NAME}", "zoo:sentiment", "zoo:spam"]
    with sessions() as session:
        competition = service.get_competition(session, "tiny")
        competition.allowed_models = allowed
        competition.time_limit_seconds = 600
        session.commit()
    tarball = full_weight_starter_kit(f"zoo:{ZOO_BASE_NAME}", ["zoo:sentiment", "zoo:spam"])
    submit("LLM-Merging.tar.gz", tarball)
    done = run()
    assert done.status == "scored", (done.error, done.log)
    assert set(done.scores) == {"mc", "gen"}
    assert "zoo:sentiment, zoo:spam" in done.log and "Traceback" not in done.log, done.log
    built = sorted(p.name for p in (cache / "zoo").iterdir())
    assert built == sorted([ZOO_BASE_NAME, "sentiment", "spam"])  # what the competition admits
    assert all(zoo_model_problem(cache / "zoo" / name) is None for name in built)


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
def test_every_job_reads_the_calibration_files_and_cannot_change_them(arena, models) -> None:
    submit, run, sessions, data_dir = arena
    calibration = MC.replace("q1,Is the sky blue?", "c1,Is ice cold?").encode()
    with sessions() as session:
        competition = service.get_competition(session, "tiny")
        service.add_calibration(session, data_dir, competition, "ice", calibration)
        session.commit()
    prelude = """\
        import os
        path = os.path.join(os.environ["MERGEARENA_CALIBRATION"], "ice.csv")
        print("CALIBRATION:", open(path).read().splitlines()[1].split(",")[0])
        for attempt in (lambda: open(path, "a"), lambda: open(path + ".new", "w")):
            try:
                attempt()
                print("CALIBRATION: WRITTEN")
            except OSError as error:
                print("CALIBRATION: read-only", type(error).__name__)
        """
    submit("calibrated.py", _method_file(models, prelude))
    done = run()
    assert done.status == "scored", done.log
    assert "CALIBRATION: c1" in done.log and "WRITTEN" not in done.log, done.log
    assert done.log.count("CALIBRATION: read-only") == 2
    assert set(done.scores) == {"mc", "gen"}  # calibration files are not tasks


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
        try:
            print("DATA DIR HOLDS:", os.listdir({str(data_dir)!r}))
        except OSError as error:
            print("DATA DIR: not there", type(error).__name__)
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
    assert "DATA DIR: not there FileNotFoundError" in done.log, done.log
    assert done.status == "scored", done.log


LOOK = """\
    import json, os
    import torch, transformers, mergearena  # the environment a job needs is there

    def look(path):
        try:
            if os.path.isdir(path):
                return sorted(os.listdir(path))
            with open(path, "rb") as handle:
                return "read " + repr(handle.read(40))
        except OSError as error:
            return type(error).__name__

    print("SEEN:", json.dumps({{name: look(path) for name, path in {paths!r}.items()}}))
    """


def _seen(log: str) -> dict[str, object]:
    line = next(line for line in log.splitlines() if line.startswith("SEEN: "))
    return json.loads(line.removeprefix("SEEN: "))


def _zoo_model(directory: Path, source: Path) -> Path:
    """``source`` as a built zoo model at ``directory``: its files and a ``zoo.json``."""
    shutil.copytree(source, directory)
    files = {p.name: {"bytes": p.stat().st_size} for p in directory.iterdir()}
    (directory / "zoo.json").write_text(json.dumps({"version": 1, "files": files}))
    return directory


@pytest.fixture()
def host_secret() -> Iterator[Path]:
    """A world-readable file of the host's, outside anything a job needs."""
    directory = Path(f"/opt/mergearena-probe-{secrets.token_hex(4)}")
    directory.mkdir(mode=0o755)
    (directory / "secret.txt").write_text("SECRET-HOST-FILE")
    (directory / "secret.txt").chmod(0o644)
    yield directory / "secret.txt"
    shutil.rmtree(directory)


@needs_sandbox
def test_code_sees_only_its_inputs_the_admitted_models_and_the_python_environment(
    arena, models, tmp_path: Path, monkeypatch, host_secret: Path
) -> None:
    """A code submission looks everywhere a rival's secrets or unadmitted models could be: the
    model cache (the zoo's task files with targets, a zoo model the allowlist leaves out), the
    zoo's committed LoRA experts, the hub cache, the data directory, this checkout, a
    world-readable file of the host, /etc/shadow. Only what the job needs is there, and the
    admitted zoo model is what it merges."""
    from mergearena.checkpoints.refs import ZOO_EXPERTS_DIR

    submit, run, sessions, data_dir = arena
    cache, hub = tmp_path / "cache", tmp_path / "hf" / "hub"
    monkeypatch.setenv("MERGEARENA_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (cache / "tasks" / "validation").mkdir(parents=True)  # the demo's layout: targets inside
    (cache / "tasks" / "validation" / "mc.csv").write_text(MC.replace("q1", "SECRET-TARGETS"))
    _zoo_model(cache / "zoo" / "sentiment", models["base"])  # admitted
    _zoo_model(cache / "zoo" / "spam", models["lora1"])  # not admitted
    for repo in ("org--admitted", "org--other"):
        (hub / f"models--{repo}" / "snapshots" / "abc").mkdir(parents=True)
        (hub / f"models--{repo}" / "snapshots" / "abc" / "config.json").write_text("{}")
    with sessions() as session:
        competition = service.get_competition(session, "tiny")
        allowed = ["zoo:sentiment", "zoo:subject-lora", "org/admitted"]
        competition.allowed_models = [*competition.allowed_models, *allowed]
        session.commit()
    checkout = Path(__file__).resolve().parents[1]
    paths = {
        "cache": cache,
        "cache zoo": cache / "zoo",
        "cache targets": cache / "tasks" / "validation" / "mc.csv",
        "unadmitted zoo model": cache / "zoo" / "spam" / "zoo.json",
        "experts": ZOO_EXPERTS_DIR,
        "full-weight expert's adapter": ZOO_EXPERTS_DIR / "sentiment",
        "admitted adapter": ZOO_EXPERTS_DIR / "subject" / "adapter_model.safetensors",
        "unadmitted adapter": ZOO_EXPERTS_DIR / "spam" / "adapter_model.safetensors",
        "hub": hub,
        "data dir": data_dir,
        "checkout's README": checkout / "README.md",
        "checkout's .git": checkout / ".git",
        "checkout's tests": checkout / "tests",
        "source folder": ZOO_EXPERTS_DIR.parents[2],
        "host file": host_secret,
        "/etc/shadow": Path("/etc/shadow"),
        "/home": Path("/home"),
    }
    look = textwrap.dedent(LOOK).format(paths={k: str(v) for k, v in paths.items()})
    recipe = {
        "merge_method": "linear",
        "models": [{"model": "zoo:sentiment", "parameters": {"weight": 1.0}}],
    }
    submit("probe.py", f"{look}\nRECIPE = {recipe!r}\n".encode())
    done = run()
    assert done.status == "scored", (done.error, done.log)
    assert "merged with linear" in done.log and "zoo:sentiment" in done.log, done.log
    seen = _seen(done.log)
    assert "SECRET" not in done.log, seen
    assert seen["cache"] == ["zoo"] and seen["cache zoo"] == ["sentiment"], seen
    assert seen["experts"] == ["sentiment", "subject"], seen
    assert seen["full-weight expert's adapter"] == ["adapter_config.json"], seen
    assert str(seen["admitted adapter"]).startswith("read b'"), seen
    assert seen["hub"] == ["models--org--admitted"], seen
    assert seen["source folder"] == ["llm_merging", "mergearena"], seen
    assert seen["/home"] == [], seen
    for name in (
        "cache targets",
        "unadmitted zoo model",
        "unadmitted adapter",
        "data dir",
        "checkout's README",
        "checkout's .git",
        "checkout's tests",
        "host file",
        "/etc/shadow",
    ):
        assert seen[name] == "FileNotFoundError", (name, seen)


FILL = """\
    import os

    written = 0
    with open("fill.bin", "wb") as handle:  # stops itself at 1 GiB, should the cap fail
        while written < 2**30:
            handle.write(b"x" * 2**20)
            handle.flush()
            written += 2**20
    print("NOT CAPPED: wrote 1 GiB")
    """


@needs_sandbox
@pytest.mark.skipif(os.geteuid() != 0, reason="a capped work area needs root to mount")
@pytest.mark.parametrize("database_url", BOTH_DATABASES, indirect=True)
def test_a_job_that_fills_its_work_area_fails_alone_and_the_next_job_is_scored(
    arena, models, tmp_path: Path
) -> None:
    """A submission writes until its work area is full: it fails saying so, no mount is left,
    and the same worker claims and scores the next job in the queue."""
    submit, _, sessions, data_dir = arena
    jobs = tmp_path / "jobs"
    settings = WorkerSettings(
        data_dir=data_dir, dtype="float32", scratch_dir=jobs, work_area_bytes=64 * 2**20
    )
    filler = submit("fill.py", _method_file(models, FILL))
    honest = submit("recipe.yaml", _recipe(models))

    filled = work_once(sessions, settings)
    assert filled is not None and filled.id == filler
    assert filled.status == "failed", filled.log
    assert filled.error.startswith("the job's work area of 0.0625 GiB is full: "), filled.error
    assert "No space left on device" in filled.log and "NOT CAPPED" not in filled.log
    work_line = filled.log.splitlines()[3]
    assert work_line.startswith("work area: 0.0625 GiB, a "), filled.log
    assert not any(line.split()[1].startswith(str(jobs)) for line in _mount_table())
    assert list(jobs.iterdir()) == []

    scored = work_once(sessions, settings)
    assert scored is not None and scored.id == honest
    assert scored.status == "scored", (scored.error, scored.log)
    assert scored.log.splitlines()[3] == work_line


def _mount_table() -> list[str]:
    return Path("/proc/self/mounts").read_text().splitlines()


@needs_sandbox
def test_a_crashing_submission_fails_with_its_log(arena, models) -> None:
    submit, run, _, _ = arena
    submit("crash.py", _method_file(models, "raise ValueError('boom from the submission')\n"))
    done = run()
    assert done.status == "failed"
    assert "boom from the submission" in done.log


@needs_sandbox
def test_a_starter_kit_submission_is_scored_on_its_own_predictions(arena, models) -> None:
    submit, run, _, _ = arena
    overrides = """\
        def predict_multiple_choice(self, batch):
            return torch.zeros(len(batch["input"]), dtype=torch.long), None  # the first choice

        def generate(self, batch):
            return None, ["hi there"] * len(batch["input"])
    """
    submit("LLM-Merging.tar.gz", _starter_kit_tarball(models, overrides))
    done = run()
    assert done.status == "scored", (done.error, done.log)
    assert done.scores["mc"] == 0.5  # the share of first-choice targets
    assert done.scores["gen"] == generation_metrics("hi there", "hi")["rougeL"]
    assert "predicted mc: 2 rows by MyAvg.predict_multiple_choice (the submission's" in done.log
    assert "predicted gen: 1 rows by MyAvg.generate (the submission's own code)" in done.log


@needs_sandbox
def test_own_inference_that_raises_fails_with_its_traceback(arena, models) -> None:
    submit, run, _, _ = arena
    raises = """\
        def predict_multiple_choice(self, batch):
            return 1 / 0
    """
    submit("LLM-Merging.tar.gz", _starter_kit_tarball(models, raises))
    done = run()
    assert done.status == "failed"
    assert "Traceback" in done.log and "return 1 / 0" in done.log, done.log
    expected = "task mc, row id 'q1': MyAvg.predict_multiple_choice raised ZeroDivisionError"
    assert expected in done.error and expected in done.log


@needs_sandbox
def test_a_hook_returning_bytes_fails_naming_task_and_row(arena, models) -> None:
    submit, run, _, _ = arena
    hook = """\
        def generate(model, tokenizer, batch):
            return None, [b"bytes"] * len(batch["input"])
        """
    submit("hooks.py", _method_file(models, hook))
    done = run()
    assert done.status == "failed", done.log
    assert "task gen, row id 'g1': hooks.generate: generated b'bytes' (bytes)" in done.error


@needs_sandbox
def test_the_time_limit_covers_the_submissions_own_inference(arena, models) -> None:
    """A job past the time limit is stopped, in its own inference too, and what it printed
    before is kept in its log."""
    submit, run, _, _ = arena
    hook = """\
        import time

        def generate(model, tokenizer, batch):
            print("inferring", flush=True)
            time.sleep(600)
        """
    # 25 s: time for the runner to start and merge (about 4 s) on a busy machine, then the hook
    # sleeps until the job is stopped, and what it printed before is kept
    submit("sleepy.py", _method_file(models, hook), time_limit=25)
    done = run()
    assert done.status == "timed_out" and "time limit of 25 s" in done.error
    assert "merged with linear" in done.log and "inferring" in done.log, done.log


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


# ------------------------------------------------------------------------------- routed experts


@pytest.fixture()
def routed(tmp_path: Path, models) -> Path:
    """``mergearena route``'s directory: the tiny base and both LoRA experts, Arrow's router."""
    from mergearena.routed.build import build_routed

    out = tmp_path / "routed"
    experts = [str(models["lora1"]), str(models["lora2"])]
    build_routed(str(models["base"]), experts, out, router="arrow", top_k=2)
    return out


def _archive(directory: Path, top: str) -> bytes:
    """``directory`` as a .tar.gz whose members sit under ``top/`` (as `tar czf` makes it)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(directory, arcname=top)
    return buffer.getvalue()


@needs_sandbox
def test_a_routed_model_is_scored_as_it_runs_with_its_base_and_adapters(
    arena, routed: Path, tmp_path: Path
) -> None:
    """No merge: the experts stay beside the base, routed per token, and the arena's scores are
    the ones `mergearena eval` gives the same directory."""
    from mergearena.evaluation import evaluate, load_task
    from mergearena.models import LanguageModel

    submit, run, _, _ = arena
    submit("routed.tar.gz", _archive(routed, "my-routed-model"))
    done = run()
    assert done.kind == "routed"
    assert done.status == "scored", (done.error, done.log)
    assert "merged with routed (arrow router, 2 experts)" in done.log, done.log
    (tmp_path / "mc.csv").write_text(MC)
    (tmp_path / "gen.csv").write_text(GEN)
    (tmp_path / "gen.yaml").write_text("max_new_tokens: 4\n")
    lm = LanguageModel.load(routed, dtype="float32")
    results = evaluate(lm, [load_task(tmp_path / "mc.csv"), load_task(tmp_path / "gen.csv")])
    assert done.scores == pytest.approx({r.task.name: r.main_value for r in results})


@needs_sandbox
def test_a_routed_model_over_the_parameter_limit_counts_its_adapters(
    arena, models, routed: Path
) -> None:
    from mergearena.arena.policy import count_parameters

    submit, run, sessions, _ = arena
    with sessions() as session:  # room for the base, not for the base and its experts
        service.get_competition(session, "tiny").max_parameters = count_parameters(models["base"])
        session.commit()
    submit("routed.tar.gz", _archive(routed, "."))
    done = run()
    assert done.status == "failed"
    assert "the routed model runs" in done.error and "its base and its adapters" in done.error


def test_a_routed_upload_is_checked_when_submitted(arena, routed: Path) -> None:
    import json

    from mergearena.errors import SubmissionError

    submit, _, _, _ = arena
    manifest_path = routed / "routed.json"
    manifest = json.loads(manifest_path.read_text())

    def upload(changed: dict) -> None:
        manifest_path.write_text(json.dumps(changed))
        submit("routed.tgz", _archive(routed, "routed"))

    with pytest.raises(SubmissionError, match="base 'zoo:smollm2-135m' is not allowed"):
        upload({**manifest, "base": "zoo:smollm2-135m"})
    escaping = [{**manifest["experts"][0], "adapter": "../elsewhere"}, *manifest["experts"][1:]]
    with pytest.raises(SubmissionError, match="experts.0.adapter: .* inside the routed model"):
        upload({**manifest, "experts": escaping})
    manifest_path.write_text(json.dumps(manifest))
    adapter = routed / manifest["experts"][0]["adapter"]
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(SubmissionError, match="safetensors only"):
        submit("routed.tgz", _archive(routed, "routed"))
