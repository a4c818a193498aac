"""`mergearena worker`: claim a submission, run it in the sandbox, score it, record the outcome.

A job runs in its own directory: ``work/`` is the only folder the sandbox writes (the task inputs,
the submission, its outputs), a size-capped file system of its own (``arena.workarea``);
``calibration/`` is mounted read-only; ``targets/`` holds the full task files for scoring and is
never mounted. Besides these the sandbox mounts only the Python environment and the models the
competition admits, each on its own (``policy.model_mounts``): not the model cache, the data
directory or the project checkout. What the run wrote is checked before it is scored
(``arena.scoring``): broken or forged predictions fail the job. While a job runs, a thread renews
its lease; if this process dies, the lease runs out and another worker retries the job.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, joinedload, sessionmaker

from mergearena.arena import queue
from mergearena.arena.db import Phase, Submission
from mergearena.arena.scoring import RejectedOutput, read_untrusted, score_task
from mergearena.arena.service import blob_path
from mergearena.errors import MergeArenaError

if TYPE_CHECKING:
    from mergearena.arena.sandbox import SandboxResult
    from mergearena.arena.workarea import WorkArea

LOG_EXCERPT_CHARS = 8000


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class WorkerSettings:
    data_dir: Path
    scratch_dir: Path | None = None  # where job directories go; the system temp dir by default
    device: str = "cpu"
    dtype: str = "auto"  # see mergearena.dtypes
    batch_size: str = "auto"
    lease_seconds: float = 60.0
    poll_seconds: float = 2.0
    worker_id: str = field(default_factory=_default_worker_id)
    # More paths every job may read, whatever its competition admits (a shared library folder):
    # not a model cache, which would show every job the models its allowlist leaves out.
    readonly: tuple[Path, ...] = ()
    # The cap of each job's work area; None: from the competition's parameter limit
    # (``workarea.work_area_bytes``).
    work_area_bytes: int | None = None


@dataclass
class JobOutcome:
    status: str
    log: str
    scores: dict[str, float] | None = None
    average: float | None = None
    error: str | None = None
    costs: dict[str, Any] | None = None  # see ``_costs``


def _excerpt(text: str) -> str:
    if len(text) <= LOG_EXCERPT_CHARS:
        return text
    half = LOG_EXCERPT_CHARS // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters left out ...]\n{text[-half:]}"


def _reported(work: Path) -> dict[str, Any]:
    """What the run's result.json says (untrusted: read with care; {} if unreadable)."""
    from mergearena.arena.runner import RESULT_FILE

    try:
        document = json.loads(read_untrusted(work / "out" / RESULT_FILE, work, max_bytes=2**20))
    except (RejectedOutput, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def _costs(result: SandboxResult, reported: dict[str, Any], gpu: bool) -> dict[str, Any]:
    """What a run cost. Measured by the worker, outside the sandbox: ``seconds`` (the whole
    run: merge and inference), ``gpu_seconds`` and ``peak_rss_bytes`` (the largest process).
    Reported by the run itself (its code could misstate them): ``merge_seconds``,
    ``parameters`` (of the merged model) and ``peak_gpu_bytes``."""

    def count(key: str) -> float | None:
        value = reported.get(key)
        valid = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
        return value if valid else None

    return {
        "seconds": result.wall_seconds,
        "gpu_seconds": result.wall_seconds if gpu else 0.0,
        "peak_rss_bytes": result.peak_rss_bytes,
        "merge_seconds": count("merge_seconds"),
        "parameters": count("parameters"),
        "peak_gpu_bytes": count("peak_gpu_bytes"),
    }


def _ending(result: SandboxResult) -> str:
    """How the run ended: "the run exited with code 3", "the run was killed: the job's
    processes together passed the memory limit of 16 GiB"."""
    return f"the run {'was ' if result.status == 'killed' else ''}{result.detail}"


def _run_error(reported: dict[str, Any], result: SandboxResult, area: WorkArea) -> str:
    """Why the run failed: a full work area first (what the run's own error, often a bare
    "No space left on device" from deep inside a library, means), how it ended, then the error
    its result.json records (cut short)."""
    message = _ending(result)
    if area.is_full():
        message = f"{area.full_message()}: {message}"
    error = reported.get("error")
    if not isinstance(error, str) or not error:
        return message
    return f"{message}: {error[:2000]}{'...' if len(error) > 2000 else ''}"


def _python_paths() -> list[Path]:
    """What the runner's interpreter needs readable in the sandbox: its prefixes (the standard
    library and site-packages) and the two packages it runs, wherever they are installed (an
    editable install keeps them in a checkout's src/: they alone are mounted, not the checkout
    with its tests and .git), and the folders of PYTHONPATH and LD_LIBRARY_PATH, which the job's
    environment keeps."""
    import llm_merging
    import mergearena

    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(os.path.realpath(sys.executable)).parent}
    for package in (mergearena, llm_merging):
        assert package.__file__ is not None  # each is a regular package, with an __init__.py
        paths.add(Path(package.__file__).resolve().parent)
    for variable in ("PYTHONPATH", "LD_LIBRARY_PATH"):
        paths.update(Path(p) for p in os.environ.get(variable, "").split(os.pathsep) if p)
    return sorted(p for p in paths if p.exists())


def _write_job(settings: WorkerSettings, submission: Submission, root: Path):
    """Lay out work/ (what the sandbox sees and writes), calibration/ (what it reads) and
    targets/ (what only the scorer reads)."""
    from mergearena.arena.safetar import extract_archive

    work, targets = root / "work", root / "targets"
    (work / "tasks").mkdir(parents=True)
    targets.mkdir()
    task_paths = []
    for task in submission.phase.tasks:
        inputs = work / "tasks" / f"{task.name}.csv"
        shutil.copyfile(blob_path(settings.data_dir, task.inputs_sha256), inputs)
        shutil.copyfile(blob_path(settings.data_dir, task.full_sha256), targets / inputs.name)
        if task.sidecar is not None:
            for directory in (work / "tasks", targets):
                (directory / f"{task.name}.json").write_text(task.sidecar)
        task_paths.append(inputs)
    # The competition's calibration files, beside work/ (which the job may write): the sandbox
    # binds them read-only.
    calibration = root / "calibration"
    calibration.mkdir(mode=0o755)
    for record in submission.phase.competition.calibration:
        path = calibration / f"{record.name}.csv"
        shutil.copyfile(blob_path(settings.data_dir, record.sha256), path)
        path.chmod(0o444)
    upload = blob_path(settings.data_dir, submission.file_sha256)
    name = submission.file_name
    if submission.kind == "recipe" or name.endswith(".py"):
        (work / "submission").mkdir()
        entry = work / "submission" / ("recipe.yaml" if submission.kind == "recipe" else name)
        shutil.copyfile(upload, entry)
    else:
        archive = root / name
        shutil.copyfile(upload, archive)
        entry = work / "submission"
        extract_archive(archive, entry)
    competition = submission.phase.competition
    spec = {
        "kind": submission.kind,
        "submission": str(entry),
        "tasks": [str(p) for p in task_paths],
        "out": str(work / "out"),
        "allowed_models": list(competition.allowed_models),
        "max_parameters": competition.max_parameters,
        "device": settings.device,
        "dtype": settings.dtype,
        "batch_size": settings.batch_size,
        "mc_rule": competition.mc_rule,
        "fewshot": competition.fewshot,
        "cot": competition.cot,
        "calibration": str(calibration),
    }
    job = work / "job.json"
    job.write_text(json.dumps(spec, indent=2))
    return job, work, targets, calibration


def build_zoo_experts(allowed_models: Sequence[str]) -> None:
    """Build the full-weight zoo experts (``zoo:<task>``) that ``allowed_models`` admits and
    that are not built yet, here, outside the sandbox: the sandbox sees the cache read-only, and
    resolving a reference never builds anything.

    Everything the competition admits, not what one job names: a code submission's models are
    known only by running its code, which happens in the sandbox. The cost is a few seconds and
    270 MB per expert, once per cache; after that, a few file checks per job. Without a prepared
    zoo base there is nothing to build from. A failure is reported on stderr, not to the team:
    a job that then asks for the model fails with a message saying it is not built.
    """
    from mergearena.arena.policy import is_listed
    from mergearena.checkpoints.refs import (
        ZOO_BASE_NAME,
        zoo_expert_names,
        zoo_model_dir,
        zoo_model_problem,
    )

    if zoo_model_problem(zoo_model_dir(ZOO_BASE_NAME)) is not None:
        return
    wanted = [
        task
        for task in zoo_expert_names()
        if is_listed(f"zoo:{task}", allowed_models)
        and zoo_model_problem(zoo_model_dir(task)) is not None
    ]
    if not wanted:
        return
    from mergearena.zoo.catalog import build_expert

    for task in wanted:
        try:
            build_expert(task)
        except (MergeArenaError, OSError) as error:
            print(f"worker: cannot build zoo:{task} ({error})", file=sys.stderr, flush=True)


def run_job(session: Session, settings: WorkerSettings, submission: Submission) -> JobOutcome:
    """Run one claimed submission to an outcome; never raises for a submission's own fault."""
    from mergearena.arena.workarea import job_folder_prefix, work_area, work_area_bytes

    competition = submission.phase.competition
    scratch = _scratch(settings)
    scratch.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=job_folder_prefix(submission.id), dir=scratch))
    size = settings.work_area_bytes or work_area_bytes(competition.max_parameters)
    try:
        with work_area(root / "work", size) as area:
            try:
                job, work, targets, calibration = _write_job(settings, submission, root)
                session.commit()  # hold no transaction open for the length of the run
            except MergeArenaError as error:
                return JobOutcome("failed", str(error), error=str(error))
            return _run_and_score(settings, submission, area, job, targets, calibration)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _scratch(settings: WorkerSettings) -> Path:
    return settings.scratch_dir or Path(tempfile.gettempdir())


def _job_environment(work: Path, calibration: Path) -> dict[str, str]:
    """The runner's whole environment: models are found by reference inside the sandbox at the
    paths they have outside (``MERGEARENA_CACHE``, the hub cache), offline."""
    from mergearena.checkpoints.refs import mergearena_cache_dir

    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface"))
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": str(work),
        "MERGEARENA_CACHE": str(mergearena_cache_dir()),
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": os.environ.get("HF_HUB_CACHE") or str(hf_home / "hub"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",  # a run killed at the time limit keeps its last lines
        "LANG": "C.UTF-8",
        "MERGEARENA_CALIBRATION": str(calibration),  # the calibration files, read-only
    }
    for name in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "PYTHONPATH"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _run_and_score(
    settings: WorkerSettings,
    submission: Submission,
    area: WorkArea,
    job: Path,
    targets: Path,
    calibration: Path,
) -> JobOutcome:
    """Run the job laid out in ``area`` in the sandbox, then score what it wrote."""
    from mergearena.arena.policy import model_mounts
    from mergearena.arena.sandbox import Limits, run_sandboxed, sandbox_available
    from mergearena.evaluation.tasks import load_task

    competition = submission.phase.competition
    work = area.path
    reason = sandbox_available()
    if reason is not None and submission.kind == "code" and not competition.allow_unsandboxed:
        message = f"code submissions need a sandbox, and this worker has none: {reason}"
        return JobOutcome("failed", message, error=message)
    build_zoo_experts(competition.allowed_models)
    env = _job_environment(work, calibration)
    # A GPU worker passes the NVIDIA device files through; CUDA reserves far more address
    # space than it uses, so RLIMIT_AS cannot bound its memory (the GPU's own size does).
    # The competition's memory limit still bounds the job's resident memory as a whole,
    # where the machine delegates cgroups (see the sandbox's log line).
    gpu = settings.device.startswith("cuda")
    devices = sorted(Path("/dev").glob("nvidia*")) if gpu else []
    # Only the models the competition admits are there to read, each on its own.
    models = model_mounts(competition.allowed_models, Path(env["HF_HUB_CACHE"]))
    readonly = [*_python_paths(), calibration, *models.readonly, *settings.readonly]
    result = run_sandboxed(
        [sys.executable, "-m", "mergearena.arena.runner", str(job)],
        workdir=work,
        readonly=[p for p in readonly if p.exists()],
        hidden=[settings.data_dir.absolute(), targets, *models.hidden],
        env=env,
        limits=Limits(
            wall_seconds=competition.time_limit_seconds,
            memory_bytes=None if gpu else competition.memory_limit_bytes,
            total_memory_bytes=competition.memory_limit_bytes,
        ),
        sandbox=reason is None,
        devices=devices,
    )
    ending = _ending(result)
    if result.peak_memory_bytes is not None:  # measured where cgroups hold the job
        ending += f"; its processes together peaked at {result.peak_memory_bytes / 2**30:.2f} GiB"
    # which guards and limits held it first, how it ended last
    output = f"{result.confinement}\n{area.description}\n{result.output}\n{ending}"
    log = _excerpt(output)
    reported = _reported(work)
    costs = _costs(result, reported, gpu)
    if result.status == "timed_out":
        limit = competition.time_limit_seconds
        message = f"stopped at the time limit of {limit} s (for merge and inference together)"
        return JobOutcome("timed_out", log, error=message, costs=costs)
    if result.returncode != 0:
        error = _run_error(reported, result, area)
        return JobOutcome("failed", log, error=error, costs=costs)
    scores: dict[str, float] = {}
    for task in submission.phase.tasks:
        full = load_task(targets / f"{task.name}.csv")
        predictions = work / "out" / "predictions" / f"{task.name}.csv"
        try:
            scores[task.name] = score_task(full, predictions, root=work).value
        except RejectedOutput as error:  # broken or forged predictions: not scored at all
            return JobOutcome("failed", _excerpt(f"{output}\n{error}"), error=str(error))
    average = sum(scores.values()) / len(scores) if scores else None
    return JobOutcome("scored", log, scores=scores, average=average, costs=costs)


class _LeaseKeeper(threading.Thread):
    """Renews a job's lease every third of its length until stopped."""

    def __init__(self, sessions: sessionmaker, submission_id: int, settings: WorkerSettings):
        super().__init__(daemon=True)
        self.sessions, self.submission_id, self.settings = sessions, submission_id, settings
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.settings.lease_seconds / 3):
            with self.sessions() as session:
                queue.renew(
                    session,
                    self.submission_id,
                    self.settings.worker_id,
                    self.settings.lease_seconds,
                )


def work_once(sessions: sessionmaker, settings: WorkerSettings) -> Submission | None:
    """Claim and process one job; returns it (as recorded), or None if the queue was empty."""
    with sessions() as session:
        submission = queue.claim(session, settings.worker_id, settings.lease_seconds)
        if submission is None:
            return None
        keeper = _LeaseKeeper(sessions, submission.id, settings)
        keeper.start()
        try:
            outcome = run_job(session, settings, submission)
        except Exception as error:  # a bug of ours: record it rather than lose the job
            outcome = JobOutcome("failed", repr(error), error=f"internal error: {error!r}")
        finally:
            keeper.stopped.set()
            keeper.join()
        queue.finish(
            session,
            submission.id,
            settings.worker_id,
            status=outcome.status,
            log=outcome.log,
            scores=outcome.scores,
            average=outcome.average,
            error=outcome.error,
            costs=outcome.costs,
        )
        session.expire_all()
        # load what callers read after the session closes
        loads = [
            joinedload(Submission.phase).joinedload(Phase.competition),
            joinedload(Submission.team),
        ]
        return session.get(Submission, submission.id, options=loads, populate_existing=True)


def run_worker(
    sessions: sessionmaker,
    settings: WorkerSettings,
    *,
    max_jobs: int | None = None,
    until_empty: bool = False,
    report: Any = None,
) -> int:
    """Process jobs until ``max_jobs`` are done, or the queue is empty with ``until_empty``,
    else forever (polling). Returns how many jobs were processed."""
    from mergearena.arena.workarea import remove_abandoned_jobs

    for folder in remove_abandoned_jobs(_scratch(settings)):
        print(f"worker: removed {folder}, left by a worker that died", file=sys.stderr)
    done = 0
    while max_jobs is None or done < max_jobs:
        submission = work_once(sessions, settings)
        if submission is None:
            if until_empty:
                break
            time.sleep(settings.poll_seconds)
            continue
        done += 1
        if report is not None:
            report(submission)
    return done
