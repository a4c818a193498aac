"""The search: an Optuna study over a space, its trials merged in memory and scored by workers.

The study asks for a trial, the space turns its suggestions into a recipe, a worker merges it in
memory and scores one task after another (the pruner may stop it after any), and the study is
told the result. Workers are this process (``workers=1``, no Ray) or Ray actors on an embedded
local Ray or a cluster. The study lives in SQLite in the output directory or in a database by URL,
so ``resume`` continues one that was interrupted: a trial left running by a killed process, or
lost with a Ray worker that died, is marked failed, never lost, and the study goes on.

Outputs (rewritten after every trial, each file replaced whole): ``best.yaml``, a plain recipe
``mergearena merge`` runs; ``trials.csv``; for several objectives ``pareto/``, one recipe per
trial of the Pareto front; at the end, plots as PNG and, with a holdout, ``holdout.csv``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mergearena.checkpoints.writer import write_atomic
from mergearena.engine import plan_merge
from mergearena.errors import MergeArenaError, RecipeError, SearchError
from mergearena.recipe import parse_recipe
from mergearena.search.space import SearchSpace, parse_space
from mergearena.search.worker import TaskSpec, TrialWorker
from mergearena.zoo import tasks as zoo_tasks
from mergearena.zoo.prepare import task_files

SAMPLERS = ("tpe", "cmaes", "nsga2", "gp")
SIZE = "size"  # the L1 norm of the merged model's difference from base_model, minimised
AVERAGE = "average"
Direction = Literal["minimize", "maximize"]  # an objective's, as optuna spells it
HOLDOUT_TRIALS = 5  # the best trials rescored on the holdout rows


@dataclass
class SearchSettings:
    """What ``mergearena search`` was asked (see the CLI's help for each)."""

    space: Path
    tasks: list[str]
    out: Path
    trials: int = 30
    sampler: str = "tpe"
    objectives: list[str] = field(default_factory=lambda: [AVERAGE])
    limit: int | None = 50
    holdout: float = 0.0
    storage: str | None = None
    study_name: str | None = None
    resume: bool = False
    ray_address: str | None = None
    workers: int = 1
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int | str = "auto"
    seed: int = 0
    prune: bool = True
    cache_gb: float | None = None
    use_ray: bool | None = None  # None: Ray when workers > 1 or ray_address is given


@dataclass
class SearchReport:
    study: Any
    out: Path
    best: Path | None
    ran: int  # trials this call ran
    interrupted: bool = False
    holdout: list[dict[str, Any]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------ settings


def resolve_tasks(names: list[str]) -> list[tuple[str, Path]]:
    """``(name, csv)`` for each ``--tasks`` entry: a zoo task's validation split, or a CSV file.

    The search never reads a test split: a zoo task is its validation split, and a CSV file in a
    directory named ``test`` (or named ``test.csv``) is refused.
    """
    if not names:
        raise SearchError("--tasks: name at least one task (a zoo task or a CSV file)")
    found: list[tuple[str, Path]] = []
    for name in names:
        path = Path(name)
        if name in zoo_tasks.TASK_NAMES and not path.exists():
            found.append((name, task_files("validation", [name])[0]))
            continue
        if not path.is_file():
            raise SearchError(
                f"--tasks {name}: neither a zoo task ({', '.join(zoo_tasks.TASK_NAMES)}) nor a "
                f"CSV file"
            )
        if path.stem == "test" or path.resolve().parent.name == "test":
            raise SearchError(
                f"--tasks {name}: a search never reads a test split (that is what a leaderboard "
                f"scores at the end); search on validation rows and keep some out with --holdout"
            )
        found.append((path.stem, path))
    names_only = [n for n, _ in found]
    twice = sorted({n for n in names_only if names_only.count(n) > 1})
    if twice:
        raise SearchError(f"--tasks: {', '.join(twice)} given twice; task names must differ")
    return found


def _directions(objectives: list[str], task_names: list[str]) -> list[Direction]:
    known = [AVERAGE, SIZE, *task_names]
    for name in objectives:
        if name not in known:
            raise SearchError(
                f"--objectives {name}: not an objective; use {AVERAGE}, {SIZE} or a task of "
                f"--tasks ({', '.join(task_names)})"
            )
    if len(set(objectives)) != len(objectives):
        raise SearchError(f"--objectives {' '.join(objectives)}: an objective is named twice")
    return ["minimize" if name == SIZE else "maximize" for name in objectives]


def _sampler(name: str, seed: int, objectives: int, trials: int) -> Any:
    import optuna

    if name == "tpe":
        with warnings.catch_warnings():  # multivariate and group are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=max(4, min(50, trials // 5))
        )
    if objectives > 1:
        raise SearchError(
            f"--sampler {name} optimises one objective; with several use tpe or nsga2"
        )
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise SearchError(
                "--sampler cmaes needs the cmaes package: pip install cmaes"
            ) from None
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        try:
            import scipy  # noqa: F401
        except ImportError:
            raise SearchError("--sampler gp needs scipy: pip install scipy") from None
        return optuna.samplers.GPSampler(seed=seed)
    raise SearchError(f"--sampler {name!r}: use one of {', '.join(SAMPLERS)}")


def _storage(url: str) -> Any:
    """The study's storage, connected now: a URL that cannot be reached fails before any trial."""
    import optuna

    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    except Exception as error:  # sqlalchemy's and the drivers' errors alike
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SearchError(f"--storage {url}: cannot be reached ({first})") from None


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 30}}
    return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}


def check_settings(settings: SearchSettings) -> tuple[SearchSpace, list[tuple[str, Path]]]:
    """Everything checkable before a model is opened: the space, tasks, objectives, sampler."""
    if settings.trials < 1:
        raise SearchError(f"--trials must be at least 1, got {settings.trials}")
    if settings.workers < 1:
        raise SearchError(f"--workers must be at least 1, got {settings.workers}")
    if settings.limit is not None and settings.limit < 1:
        raise SearchError(f"--limit must be at least 1, got {settings.limit}")
    if not 0 <= settings.holdout < 1:
        raise SearchError(f"--holdout is a fraction of the rows in [0, 1), got {settings.holdout}")
    space = parse_space(settings.space)
    tasks = resolve_tasks(settings.tasks)
    directions = _directions(settings.objectives, [name for name, _ in tasks])
    _sampler(settings.sampler, settings.seed, len(directions), settings.trials)
    return space, tasks


# -------------------------------------------------------------------------------------- workers


class _Local:
    """Workers in this process: each call runs at once; ``next`` hands its outcome back."""

    def __init__(self, make: Callable[[], TrialWorker], count: int) -> None:
        self.workers = [make() for _ in range(count)]
        self.done: list[tuple[int, Any, BaseException | None]] = []

    def start(self, slot: int, method: str, *args: Any) -> None:
        try:
            self.done.append((slot, getattr(self.workers[slot], method)(*args), None))
        except Exception as error:  # handed back like a Ray worker's: the trial fails first
            self.done.append((slot, None, error))

    def next(self) -> tuple[int, Any, BaseException | None]:
        return self.done.pop(0)

    def lost(self, error: BaseException | None) -> bool:
        return False

    def close(self) -> None:
        self.workers.clear()


class _Ray:
    """Workers as Ray actors, each asking for the CPUs (or share of a GPU) a trial needs."""

    def __init__(self, settings: SearchSettings, arguments: dict[str, Any]) -> None:
        import ray

        self.ray = ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.started_here = not ray.is_initialized()
        if self.started_here:
            if settings.ray_address:
                _check_answers(settings.ray_address)
            try:
                if settings.ray_address:
                    ray.init(
                        address=settings.ray_address, log_to_driver=False, configure_logging=False
                    )
                else:
                    ray.init(log_to_driver=False, configure_logging=False, include_dashboard=False)
            except Exception as error:
                where = settings.ray_address or "a local Ray"
                raise SearchError(
                    f"--ray-address {where}: Ray did not answer ({str(error).splitlines()[0]}); "
                    f"start a cluster with `ray start --head` and pass the address it prints, "
                    f"or leave --ray-address out for a local Ray"
                ) from None
        cpus = ray.cluster_resources().get("CPU", 1)
        gpus = ray.cluster_resources().get("GPU", 0)
        on_gpu = settings.device.startswith("cuda")
        if on_gpu and not gpus:
            raise SearchError("--device cuda: the Ray cluster has no GPU")
        threads = max(1, int(cpus // settings.workers))
        options = {"num_cpus": threads if not on_gpu else 1}
        if on_gpu:
            options["num_gpus"] = gpus / settings.workers if settings.workers > 1 else 1
        self.actor = ray.remote(TrialWorker).options(**options)
        self.arguments = {**arguments, "threads": threads}
        self.workers = [self._make() for _ in range(settings.workers)]
        self.pending: dict[Any, int] = {}

    def _make(self) -> Any:
        return self.actor.remote(**self.arguments)

    def pids(self) -> list[int]:
        return self.ray.get([worker.pid.remote() for worker in self.workers])

    def start(self, slot: int, method: str, *args: Any) -> None:
        self.pending[getattr(self.workers[slot], method).remote(*args)] = slot

    def next(self) -> tuple[int, Any, BaseException | None]:
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        slot = self.pending.pop(ready[0])
        try:
            return slot, self.ray.get(ready[0]), None
        except self.ray.exceptions.RayTaskError as error:
            cause = error.as_instanceof_cause()
            return slot, None, cause if isinstance(cause, MergeArenaError) else error
        except self.ray.exceptions.RayActorError as error:
            self.workers[slot] = self._make()  # the worker died: a new one takes its place
            return slot, None, error

    def lost(self, error: BaseException | None) -> bool:
        return isinstance(error, self.ray.exceptions.RayActorError)

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)
        if self.started_here:
            self.ray.shutdown()


def _check_answers(address: str) -> None:
    """Refuse a Ray address nothing listens on within seconds (``ray.init`` would wait minutes)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        if address == "auto":
            return
        raise SearchError(f"--ray-address {address}: use HOST:PORT, as `ray start --head` prints")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise SearchError(
            f"--ray-address {address}: Ray does not answer there ({error.strerror or error}); "
            f"start a cluster with `ray start --head` and pass the address it prints, or leave "
            f"--ray-address out for a local Ray"
        ) from None


# ---------------------------------------------------------------------------------------- study


@dataclass
class _Running:
    trial: Any
    document: dict[str, Any]
    started: float
    step: int = -1  # -1: merging; then the index of the task being scored
    scores: dict[str, float] = field(default_factory=dict)
    size: float | None = None


class _Search:
    def __init__(self, settings: SearchSettings, log: Callable[[str], None]) -> None:
        import optuna

        self.settings, self.log = settings, log
        self.space, self.tasks = check_settings(settings)
        self.task_names = [name for name, _ in self.tasks]
        self.directions = _directions(settings.objectives, self.task_names)
        self.reference = self._check_models()
        settings.out.mkdir(parents=True, exist_ok=True)
        url = settings.storage or f"sqlite:///{settings.out / 'study.db'}"
        name = settings.study_name or settings.space.stem
        storage = _storage(url)
        existing = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        if name in existing and not settings.resume:
            raise SearchError(
                f"study {name!r} already exists in {url}; pass --resume to continue it, or "
                f"choose another --out (or --study)"
            )
        if settings.resume and name not in existing:
            raise SearchError(f"--resume: there is no study {name!r} in {url} to continue")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
            if settings.prune and len(self.directions) == 1
            else optuna.pruners.NopPruner()
        )
        self.study = optuna.create_study(
            study_name=name,
            storage=storage,
            directions=self.directions,
            sampler=_sampler(
                settings.sampler, settings.seed, len(self.directions), settings.trials
            ),
            pruner=pruner,
            load_if_exists=settings.resume,
        )
        self._check_same_study(name)
        self.url = url

    def _check_models(self) -> str:
        """Open every model the space names once (no tensor read): a missing or incompatible
        model fails now; returns the directory whose config and tokenizer the candidates use."""
        plan, opener = plan_merge(parse_recipe(self.space.probe(self.space.methods[0], 0)))
        try:
            base = self.space.document.get("base_model")
            if SIZE in self.settings.objectives and not base:
                raise SearchError(
                    f"--objectives {SIZE}: the size of a merge is its difference from base_model; "
                    f"the space names no base_model"
                )
            self.origin = str(opener.resolve(base)) if base else None
            return str(plan.reference.support_dir)
        finally:
            opener.close()

    def _check_same_study(self, name: str) -> None:
        about = {
            "space": self.space.text,
            "tasks": self.task_names,
            "objectives": self.settings.objectives,
            "limit": self.settings.limit,
            "holdout": self.settings.holdout,
        }
        attrs = self.study.user_attrs
        if not attrs:
            for key, value in about.items():
                self.study.set_user_attr(key, value)
            return
        changed = [key for key, value in about.items() if attrs.get(key) != value]
        if changed:
            raise SearchError(
                f"--resume: study {name!r} was started with another {', '.join(changed)}; resume "
                f"it with the same settings, or start a new study in another --out"
            )

    # ------------------------------------------------------------------------------ running

    def task_specs(self, part: str = "search") -> list[TaskSpec]:
        s = self.settings
        return [TaskSpec(str(p), n, s.limit, s.holdout, part) for n, p in self.tasks]

    def worker_arguments(self, part: str = "search") -> dict[str, Any]:
        s = self.settings
        cache = s.cache_gb * 2**30 if s.cache_gb is not None else _default_cache_bytes(s.workers)
        return {
            "base": self.reference,
            "tasks": self.task_specs(part),
            "device": s.device,
            "dtype": s.dtype,
            "batch_size": s.batch_size,
            "cache_bytes": int(cache),
            # the holdout rows only score: no objective of theirs needs the merge's size
            "delta_from": self.origin if SIZE in s.objectives and part == "search" else None,
        }

    def finished(self) -> int:
        from optuna.trial import TrialState

        return sum(t.state != TrialState.RUNNING for t in self.study.trials)

    def fail_stale(self) -> int:
        """Trials left running by a process that is gone (``--resume``): failed, not lost."""
        from optuna.trial import TrialState

        stale = [t for t in self.study.trials if t.state == TrialState.RUNNING]
        for trial in stale:
            self.study._storage.set_trial_user_attr(
                trial._trial_id, "reason", "left running by a process that stopped"
            )
            self.study.tell(trial.number, state=TrialState.FAIL)
        return len(stale)

    def run(
        self, on_trial: Callable[[Any, Any], None] | None = None, progress: bool = False
    ) -> SearchReport:
        from optuna.trial import TrialState

        s = self.settings
        if s.resume:
            stale = self.fail_stale()
            if stale:
                self.log(f"marked {stale} trial(s) left running by an earlier process as failed")
        to_run = max(0, s.trials - self.finished())
        pool: Any
        use_ray = s.use_ray if s.use_ray is not None else s.workers > 1 or bool(s.ray_address)
        if not use_ray:
            pool = _Local(lambda: TrialWorker(**self.worker_arguments()), 1)
        else:
            pool = _Ray(s, self.worker_arguments())
        running: dict[int, _Running] = {}
        launched = ran = 0
        interrupted = False

        def launch(slot: int) -> None:
            nonlocal launched
            while launched < to_run:
                launched += 1
                trial = self.study.ask()
                document = self.space.recipe(trial)
                trial.set_user_attr("recipe", document)
                try:
                    parse_recipe(document)
                except RecipeError as error:  # e.g. too few models left in for the method
                    self._finish(trial, TrialState.FAIL, reason=str(error))
                    continue
                running[slot] = _Running(trial, document, time.perf_counter())
                pool.start(slot, "merge", document)
                return

        try:
            with _progress_bar(progress, to_run) as advance:
                for slot in range(s.workers if use_ray else 1):
                    launch(slot)
                while running:
                    slot, outcome, error = pool.next()
                    state = running[slot]
                    if on_trial is not None and state.step == -1 and error is None:
                        on_trial(state.trial, pool)
                    done = self._advance(state, outcome, error, pool, slot, lost=pool.lost(error))
                    if done:
                        del running[slot]
                        ran += 1
                        self.write_outputs()
                        advance(self._best_text())
                        launch(slot)
        except KeyboardInterrupt:
            interrupted = True
            for state in running.values():
                self._finish(state.trial, TrialState.FAIL, reason="interrupted (Ctrl-C)")
            self.log("interrupted: the study is saved; run again with --resume to continue it")
        finally:
            pool.close()
        best = self.write_outputs()
        report = SearchReport(self.study, s.out, best, ran, interrupted)
        if not interrupted:
            report.plots = self.write_plots()
            if s.holdout:
                report.holdout = self.score_holdout()
        return report

    def _advance(
        self,
        state: _Running,
        outcome: Any,
        error: BaseException | None,
        pool: Any,
        slot: int,
        *,
        lost: bool,
    ) -> bool:
        """Take one worker's answer for a trial; returns whether the trial is finished."""
        from optuna.trial import TrialState

        if error is not None:
            reason = (
                f"the worker died ({type(error).__name__}); a new one took its place"
                if lost
                else str(error)
            )
            self._finish(state.trial, TrialState.FAIL, reason=reason)
            if not lost and not isinstance(error, MergeArenaError):
                raise error
            return True
        if state.step == -1:
            state.size = outcome
        else:
            state.scores[self.task_names[state.step]] = float(outcome)
            if len(self.directions) == 1 and state.step < len(self.task_names) - 1:
                state.trial.report(statistics.fmean(state.scores.values()), state.step)
                if state.trial.should_prune():
                    self._finish(state.trial, TrialState.PRUNED, state=state)
                    return True
        state.step += 1
        if state.step < len(self.task_names):
            pool.start(slot, "score", state.step)
            return False
        self._finish(state.trial, TrialState.COMPLETE, state=state)
        return True

    def _finish(
        self, trial: Any, outcome: Any, *, state: _Running | None = None, reason: str = ""
    ) -> None:
        from optuna.trial import TrialState

        if state is not None:
            trial.set_user_attr("scores", state.scores)
            if state.size is not None:
                trial.set_user_attr("size", state.size)
            trial.set_user_attr("seconds", round(time.perf_counter() - state.started, 2))
            if state.scores:
                trial.set_user_attr("average", statistics.fmean(state.scores.values()))
        if reason:
            trial.set_user_attr("reason", reason)
        if outcome == TrialState.COMPLETE and state is not None:
            values = [self._objective(name, state) for name in self.settings.objectives]
            self.study.tell(trial, values)
        else:
            self.study.tell(trial, state=outcome)

    def _objective(self, name: str, state: _Running) -> float:
        if name == AVERAGE:
            return statistics.fmean(state.scores.values())
        if name == SIZE:
            if state.size is None:
                raise RuntimeError(
                    f"trial {state.trial.number}: the merge measured no size, yet {SIZE} is an "
                    f"objective (the workers were started without delta_from)"
                )
            return float(state.size)
        return state.scores[name]

    # ------------------------------------------------------------------------------ outputs

    def complete(self) -> list[Any]:
        from optuna.trial import TrialState

        return [t for t in self.study.trials if t.state == TrialState.COMPLETE]

    def best_trials(self) -> list[Any]:
        """The best trial (one objective), or the Pareto front best average first."""
        if not self.complete():
            return []
        if len(self.directions) == 1:
            return [self.study.best_trial]
        return sorted(self.study.best_trials, key=lambda t: -t.user_attrs.get("average", 0.0))

    def _best_text(self) -> str:
        best = self.best_trials()
        if not best:
            return "no trial completed yet"
        values = ", ".join(
            f"{n} {v:.4g}" for n, v in zip(self.settings.objectives, best[0].values, strict=True)
        )
        return f"best: trial {best[0].number} ({values})"

    def recipe_text(self, trial: Any) -> str:
        s = self.settings
        values = ", ".join(f"{n} {v:.4f}" for n, v in zip(s.objectives, trial.values, strict=True))
        header = [
            f"Found by `mergearena search {s.space.name}`: trial {trial.number} of the study "
            f"{self.study.study_name!r} ({len(self.study.trials)} trials, sampler {s.sampler}, "
            f"seed {s.seed}).",
            f"Scored on the validation rows of {', '.join(self.task_names)} (limit "
            f"{s.limit or 'none'} per task, holdout {s.holdout}): {values}.",
            "Per task: "
            + ", ".join(f"{k} {v:.4f}" for k, v in trial.user_attrs.get("scores", {}).items())
            + ".",
        ]
        recipe = parse_recipe(trial.user_attrs["recipe"])
        lines = [part for line in header for part in textwrap.wrap(line, 97)]
        return "".join(f"# {line}\n" for line in lines) + recipe.to_yaml()

    def write_outputs(self) -> Path | None:
        out = self.settings.out
        write_atomic(out / "trials.csv", self.trials_csv().encode())
        best = self.best_trials()
        if not best:
            return None
        write_atomic(out / "best.yaml", self.recipe_text(best[0]).encode())
        if len(self.directions) > 1:
            front = out / "pareto"
            keep = {f"trial-{t.number:04d}.yaml" for t in best}
            for old in front.glob("trial-*.yaml") if front.is_dir() else []:
                if old.name not in keep:
                    old.unlink()
            for trial in best:
                write_atomic(
                    front / f"trial-{trial.number:04d}.yaml", self.recipe_text(trial).encode()
                )
        return out / "best.yaml"

    def trials_csv(self) -> str:
        names = [d.name for d in self.space.dimensions]
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        objective_columns = [f"objective:{n}" for n in self.settings.objectives]
        writer.writerow(
            [
                "trial",
                "state",
                *objective_columns,
                AVERAGE,
                *self.task_names,
                SIZE,
                "seconds",
                "reason",
                *names,
            ]
        )
        for trial in self.study.trials:
            attrs = trial.user_attrs
            scores = attrs.get("scores", {})
            values = trial.values or [None] * len(objective_columns)
            writer.writerow(
                [
                    trial.number,
                    trial.state.name.lower(),
                    *[_cell(v) for v in values],
                    _cell(attrs.get("average")),
                    *[_cell(scores.get(n)) for n in self.task_names],
                    attrs.get("size", ""),
                    attrs.get("seconds", ""),
                    attrs.get("reason", ""),
                    *[_cell(trial.params.get(n)) for n in names],
                ]
            )
        return buffer.getvalue()

    def write_plots(self) -> list[Path]:
        """Optimisation history (or the Pareto front) and parameter importances, as PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as plots

        written: list[Path] = []
        if len(self.complete()) < 2:
            return written
        single = len(self.directions) == 1
        drawings: list[tuple[str, Callable[[], Any]]] = []
        if single:
            drawings.append(("history.png", lambda: plots.plot_optimization_history(self.study)))
        elif len(self.directions) in (2, 3):
            drawings.append(
                (
                    "pareto.png",
                    lambda: plots.plot_pareto_front(
                        self.study, target_names=self.settings.objectives
                    ),
                )
            )
        if single:
            drawings.append(("importances.png", lambda: plots.plot_param_importances(self.study)))
        for name, draw in drawings:
            try:
                with warnings.catch_warnings():  # experimental, and few trials per regime
                    warnings.simplefilter("ignore")
                    axes = draw()
            except (ValueError, RuntimeError, ZeroDivisionError) as error:
                self.log(f"{name}: not drawn ({error})")
                continue
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(9, 5)
            figure.tight_layout()
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=110)
            plt.close(figure)
            write_atomic(self.settings.out / name, buffer.getvalue())
            written.append(self.settings.out / name)
        return written

    def score_holdout(self) -> list[dict[str, Any]]:
        """The best trials merged again and scored on the rows the search never saw."""
        complete = self.complete()
        if len(self.directions) == 1:
            sign = 1 if self.directions[0] == "maximize" else -1
            top = sorted(complete, key=lambda t: -sign * t.values[0])[:HOLDOUT_TRIALS]
        else:
            top = self.best_trials()[:HOLDOUT_TRIALS]
        if not top:
            return []
        worker = TrialWorker(**self.worker_arguments("holdout"))
        rows = []
        for trial in top:
            worker.merge(trial.user_attrs["recipe"])
            scores = {name: worker.score(i) for i, name in enumerate(self.task_names)}
            rows.append(
                {
                    "trial": trial.number,
                    "search_average": trial.user_attrs["average"],
                    "holdout_average": statistics.fmean(scores.values()),
                    **{f"holdout:{k}": v for k, v in scores.items()},
                }
            )
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
        write_atomic(self.settings.out / "holdout.csv", buffer.getvalue().encode())
        return rows


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def _default_cache_bytes(workers: int) -> int:
    """Half the machine's memory, shared by the workers."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 * 2**30
    return total // 2 // workers


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda text: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("trials"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        transient=False,
    ) as bar:
        task = bar.add_task("", total=total)
        yield lambda text: bar.update(task, advance=1, description=text)


def run_search(
    settings: SearchSettings,
    *,
    log: Callable[[str], None] = print,
    progress: bool = False,
    on_trial: Callable[[Any, Any], None] | None = None,
) -> SearchReport:
    """Run (or resume) a search; see the module docstring. ``on_trial(trial, pool)`` is called
    when a trial's merge is done (tests use it to kill a worker mid-trial)."""
    return _Search(settings, log).run(on_trial=on_trial, progress=progress)
