#!/usr/bin/env python3
"""Search-trial benchmark: what one trial of ``mergearena search`` costs, and what Ray adds.

Three measurements on the zoo (``recipes/spaces/zoo.yaml``: five LoRA experts into SmolLM2-135M),
the same trials in each (the same sampler and seed, pruning off):

1. **On disk** (the reference: how mergekit-evolve runs a candidate): ``mergearena merge`` writes
   the candidate, it is loaded from disk and scored.
2. **In memory** (``mergearena search``): the candidate is merged from inputs cached since the
   previous trial into the loaded model and scored; merge and scoring timed apart.
3. **Sequential against Ray**: the study run in this process, then with one Ray worker given the
   same cores, both from the start (model loading included), then once more on a Ray already
   running: Ray's start is paid once per study, the rest per trial.

    .venv/bin/python bench/search_speed.py                   # 6 trials, 50 rows of 5 tasks
    .venv/bin/python bench/search_speed.py --trials 10 --limit 50 --device cuda --workers 4

``--workers N`` adds a run with N Ray workers sharing the machine (on a GPU: several trials on
one GPU) and prints trials per minute.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE = REPO_ROOT / "recipes" / "spaces" / "zoo.yaml"
TASKS = ["arithmetic", "question_type", "sentiment", "spam", "subject"]


def recipes(count: int, seed: int) -> list[dict]:
    """The first ``count`` candidates a seeded random sampler draws from the zoo's space."""
    import optuna

    from mergearena.search import parse_space

    space = parse_space(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.recipe(study.ask()) for _ in range(count)]


def on_disk(documents: list[dict], tasks: list, device: str, dtype: str) -> list[float]:
    from mergearena.engine import merge
    from mergearena.evaluation import LanguageModel, evaluate

    seconds = []
    for document in documents:
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            merge(document, Path(scratch) / "candidate")
            lm = LanguageModel.load(Path(scratch) / "candidate", device=device, dtype=dtype)
            evaluate(lm, tasks)
            seconds.append(time.perf_counter() - started)
    return seconds


def in_memory(documents: list[dict], specs: list, device: str, dtype: str) -> tuple[list, list]:
    from mergearena.search.study import _default_cache_bytes
    from mergearena.search.worker import TrialWorker

    worker = TrialWorker(
        "zoo:smollm2-135m", specs, device=device, dtype=dtype, cache_bytes=_default_cache_bytes(1)
    )
    merging, scoring = [], []
    for document in documents:
        started = time.perf_counter()
        worker.merge(document)
        merged = time.perf_counter()
        for index in range(len(specs)):
            worker.score(index)
        merging.append(merged - started)
        scoring.append(time.perf_counter() - merged)
    return merging, scoring


def study(trials: int, limit: int, device: str, use_ray: bool, workers: int, seed: int) -> float:
    from mergearena.search import SearchSettings, run_search

    with tempfile.TemporaryDirectory() as scratch:
        settings = SearchSettings(
            SPACE,
            TASKS,
            Path(scratch) / "study",
            trials=trials,
            limit=limit,
            device=device,
            seed=seed,
            prune=False,
            use_ray=use_ray,
            workers=workers,
        )
        started = time.perf_counter()
        run_search(settings, log=lambda _: None)
        return time.perf_counter() - started


def report_ray(args: argparse.Namespace) -> None:
    sequential = study(args.trials, args.limit, args.device, False, 1, args.seed)
    on_ray = study(args.trials, args.limit, args.device, True, 1, args.seed)
    print(
        f"study of {args.trials} trials: sequential {sequential:.1f} s, one Ray worker "
        f"{on_ray:.1f} s: Ray overhead {100 * (on_ray / sequential - 1):+.1f}% of wall time"
    )
    # Ray's own start (its processes) is paid once a study; the study on a running Ray:
    import ray

    started = time.perf_counter()
    ray.init(log_to_driver=False, configure_logging=False, include_dashboard=False)
    starting = time.perf_counter() - started
    warm = study(args.trials, args.limit, args.device, True, 1, args.seed)
    print(
        f"  Ray's start {starting:.1f} s; the study on a running Ray {warm:.1f} s: "
        f"{100 * (warm / sequential - 1):+.1f}% against sequential"
    )
    if args.workers > 1:
        parallel = study(args.trials, args.limit, args.device, True, args.workers, args.seed)
        print(
            f"{args.workers} Ray workers: {parallel:.1f} s, "
            f"{60 * args.trials / parallel:.2f} trials per minute"
        )
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="also run N Ray workers at once")
    parser.add_argument("--ray-only", action="store_true", help="only the studies, here and on Ray")
    args = parser.parse_args()
    print(
        f"{args.trials} trials, {args.limit} validation rows of {len(TASKS)} zoo tasks, "
        f"{args.device}, dtype {args.dtype}"
    )
    if not args.ray_only:
        report_trials(args)
    report_ray(args)


def report_trials(args: argparse.Namespace) -> None:
    from mergearena.search.worker import TaskSpec, load_rows
    from mergearena.zoo.prepare import task_files

    paths = dict(zip(TASKS, task_files("validation", TASKS), strict=True))
    specs = [TaskSpec(str(paths[name]), name, args.limit) for name in TASKS]
    tasks = [load_rows(spec) for spec in specs]
    documents = recipes(args.trials, args.seed)
    disk = on_disk(documents, tasks, args.device, args.dtype)
    merging, scoring = in_memory(documents, specs, args.device, args.dtype)
    memory = [m + s for m, s in zip(merging, scoring, strict=True)]
    # The first in-memory trial fills the cache and builds the model; the rest reuse them.
    print(f"on disk (merge, write, load, score): {statistics.median(disk):.1f} s per trial")
    print(
        f"in memory: {statistics.median(memory):.1f} s per trial (merge "
        f"{statistics.median(merging[1:] or merging):.2f} s, scoring "
        f"{statistics.median(scoring):.1f} s; first trial {memory[0]:.1f} s)"
    )
    print(
        f"  ratio on disk / in memory: {statistics.median(disk) / statistics.median(memory):.2f}x"
        f"; trials per minute in memory: {60 / statistics.median(memory):.2f}"
    )


if __name__ == "__main__":
    main()
