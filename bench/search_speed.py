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

``--random-init TOKENIZER_DIR`` swaps the zoo's base for seeded random weights of the same shape
(TOKENIZER_DIR: the zoo base's config.json, tokenizer files and chat template), for a machine the
zoo's weights cannot reach; the experts and task rows stay the zoo's. Timings then hold as far as
shapes do: a random model never stops generating early, so ``arithmetic``'s answers run to their
full 8 tokens.

    python3 bench/search_speed.py --random-init TOKENIZER_DIR --device cuda --workers 4 --ray-only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE = REPO_ROOT / "recipes" / "spaces" / "zoo.yaml"
BASE = "zoo:smollm2-135m"
TASKS = ["arithmetic", "question_type", "sentiment", "spam", "subject"]


def random_base(tokenizer_dir: Path, scratch: Path) -> None:
    """Point ``BASE`` and ``SPACE`` at seeded random weights of the zoo base's shape."""
    global BASE, SPACE
    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eval_speed import random_model

    model_dir = scratch / "random-base"
    random_model(tokenizer_dir, shape=None, dtype="bfloat16", device="cpu", out=model_dir)
    space = yaml.safe_load(SPACE.read_text())
    space["base_model"] = str(model_dir)
    SPACE = scratch / "space.yaml"
    SPACE.write_text(yaml.safe_dump(space, sort_keys=False))
    BASE = str(model_dir)


def recipes(count: int, seed: int) -> list[dict]:
    """The first ``count`` candidates a seeded random sampler draws from the zoo's space."""
    import optuna

    from mergearena.search import parse_space

    space = parse_space(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.recipe(study.ask()) for _ in range(count)]


def on_disk(documents: list[dict], tasks: list, device: str, dtype: str) -> list[float]:
    from mergearena.engine import merge
    from mergearena.evaluation import evaluate
    from mergearena.models import LanguageModel

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
        BASE, specs, device=device, dtype=dtype, cache_bytes=_default_cache_bytes(1)
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


def study(
    trials: int, limit: int, device: str, use_ray: bool, workers: int, seed: int
) -> tuple[float, float | None]:
    """The study's wall time, start included, and its steady rate in trials per minute: the
    trials completed after each worker's first (which loads the model and fills the cache),
    over the time from then to the last."""
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
        report = run_search(settings, log=lambda _: None)
        wall = time.perf_counter() - started
    done = sorted(t.datetime_complete for t in report.study.trials if t.datetime_complete)
    if len(done) <= workers:
        return wall, None
    steady = (done[-1] - done[workers - 1]).total_seconds()
    return wall, 60 * (len(done) - workers) / steady


def _rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.1f} trials/min"


def report_ray(args: argparse.Namespace) -> None:
    sequential, sequential_rate = study(args.trials, args.limit, args.device, False, 1, args.seed)
    on_ray, _ = study(args.trials, args.limit, args.device, True, 1, args.seed)
    print(
        f"study of {args.trials} trials: sequential {sequential:.1f} s (steady "
        f"{_rate(sequential_rate)}), one Ray worker {on_ray:.1f} s: Ray overhead "
        f"{100 * (on_ray / sequential - 1):+.1f}% of wall time"
    )
    # Ray's own start (its processes) is paid once a study; the study on a running Ray:
    import ray

    started = time.perf_counter()
    ray.init(log_to_driver=False, configure_logging=False, include_dashboard=False)
    starting = time.perf_counter() - started
    warm, warm_rate = study(args.trials, args.limit, args.device, True, 1, args.seed)
    print(
        f"  Ray's start {starting:.1f} s; the study on a running Ray {warm:.1f} s: "
        f"{100 * (warm / sequential - 1):+.1f}% against sequential (steady {_rate(warm_rate)})"
    )
    if args.workers > 1:
        parallel, rate = study(args.trials, args.limit, args.device, True, args.workers, args.seed)
        print(
            f"{args.workers} Ray workers: {parallel:.1f} s, "
            f"{60 * args.trials / parallel:.2f} trials per minute start included, steady "
            f"{_rate(rate)}"
        )
    ray.shutdown()


def _scratch_root() -> str | None:
    """``/dev/shm`` where there is one (no disk in the timings), else the default temp dir."""
    return "/dev/shm" if Path("/dev/shm").is_dir() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="also run N Ray workers at once")
    parser.add_argument("--ray-only", action="store_true", help="only the studies, here and on Ray")
    parser.add_argument("--random-init", type=Path, metavar="TOKENIZER_DIR", help="random base")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="search-speed-", dir=_scratch_root()) as scratch:
        if args.random_init is not None:
            random_base(args.random_init, Path(scratch))
            print(f"random weights of the zoo base's shape in {scratch}")
        run(args)


def run(args: argparse.Namespace) -> None:
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
