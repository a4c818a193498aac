"""The `mergearena` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

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


def _fail(error: Exception) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {error}", markup=True, highlight=False)
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
    for column in ("method", "base model", "models", "parameters", "reference"):
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
            spec.reference,
        )
    console.print(table)


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="The YAML merge recipe (mergekit format works).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    device: Annotated[str, typer.Option(help="Where the math runs: cpu or cuda.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for the math.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    allow_download: Annotated[
        bool, typer.Option(help="Download hub models missing from the local cache.")
    ] = False,
    shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB or 500MB.")] = "5GB",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate the recipe and inputs; write nothing.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Merge the models a recipe names into a Hugging Face checkpoint at OUT."""
    from mergearena.engine import merge as run_merge
    from mergearena.engine import plan_merge
    from mergearena.recipe import parse_recipe

    try:
        max_shard_bytes = _parse_size(shard_size)
        parsed = parse_recipe(recipe)
        if dry_run:
            plan, opener = plan_merge(parsed, allow_download=allow_download)
            opener.close()
            count = len(plan.tasks) if plan.tasks else "adapter"
            console.print(
                f"[green]ok[/]: {recipe} is valid: {plan.method.name} over "
                f"{len(plan.inputs)} model(s), {count} tensors, nothing written"
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
    console.print(
        f"[green]merged[/] {parsed.method.name} of {len(parsed.inputs())} model(s) → {result.out}: "
        f"{result.tensors} tensors, {result.bytes / 2**20:.1f} MiB in {result.seconds:.1f} s"
    )


@app.command()
def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="Where to build the demo models (default: a temp dir).")
    ] = None,
) -> None:
    """Build two small models offline, merge them with several methods, and show the results."""
    from mergearena.demo import run_demo

    try:
        run_demo(workdir, console)
    except MergeArenaError as error:
        raise _fail(error) from None


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
    except (KeyError, ValueError):
        raise MergeArenaError(
            f"--shard-size {text!r}: use a size like 5GB, 500MB or 2GiB"
        ) from None
    if size <= 0:
        raise MergeArenaError(f"--shard-size {text!r} must be positive")
    return size


if __name__ == "__main__":
    app()
