"""Build a routed model: a base, K experts kept beside it as LoRA adapters, and a router.

An expert that is a LoRA adapter is copied as it is, once it is checked against the base. A full
fine-tune is compressed to rank r (``compress_fine_tune``), so both kinds load the same way. The
prompt router's centroids come from a few calibration rows per expert (``calibrate``).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from mergearena.checkpoints.lora import (
    ADAPTER_BIN,
    ADAPTER_CONFIG,
    ADAPTER_SAFETENSORS,
    LoraAdapter,
    is_adapter_dir,
    write_adapter,
)
from mergearena.checkpoints.reader import Checkpoint
from mergearena.checkpoints.refs import resolve_model_ref
from mergearena.checkpoints.routed import (
    CENTROIDS,
    ROUTERS,
    ArrowRouter,
    Expert,
    Manifest,
    PromptRouter,
    expert_name,
)
from mergearena.checkpoints.writer import atomic_directory, save_safetensors
from mergearena.errors import CheckpointError, TaskError
from mergearena.evaluation.runner import choose_strategy, render_prompt
from mergearena.evaluation.scoring import encode_prompts
from mergearena.evaluation.tasks import Task, load_task
from mergearena.methods.registry import LoraFactors
from mergearena.models import LanguageModel, load_model, load_tokenizer
from mergearena.zoo.prepare import task_files

DEFAULT_RANK = 16  # for full fine-tunes when no LoRA expert sets the rank


def _module_name(weight_name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` → ``q_proj``, as PEFT targets modules."""
    return weight_name.removesuffix(".weight").rsplit(".", 1)[-1]


def compress_fine_tune(
    base: Checkpoint,
    tuned_dir: Path,
    out_dir: Path,
    *,
    rank: int,
    targets: set[str] | None,
    base_ref: str,
) -> float:
    """Write a full fine-tune's delta as a PEFT LoRA adapter of ``rank``; return the share of the
    delta's squared Frobenius norm it keeps.

    Each 2-D weight of a decoder layer whose module name is in ``targets`` (all of them for None)
    gets ``delta = tuned − base ≈ U diag(S) Vᵀ``, the rank-r truncated SVD found by randomized
    SVD (Halko, Martinsson & Tropp 2011; ``torch.svd_lowrank``, seeded), stored as
    ``lora_B = U √S`` and ``lora_A = √S Vᵀ`` at scale 1. What changed elsewhere (embeddings,
    norms) and the SVD's tail is dropped, and counts against the share returned.
    """
    modules: dict[str, tuple[LoraFactors, bool]] = {}
    kept = total = 0.0
    with Checkpoint.open(tuned_dir) as tuned, torch.random.fork_rng():
        torch.manual_seed(0)
        for name, info in base.tensors.items():
            other = tuned.tensors.get(name)
            if other is None or other.shape != info.shape:
                found = "missing" if other is None else f"of shape {list(other.shape)}"
                raise CheckpointError(
                    f"{tuned_dir}: tensor {name!r} is {found}, but the base has it with shape "
                    f"{list(info.shape)}: this expert was fine-tuned from another base model; "
                    "pass experts of the base given by --base"
                )
            delta = tuned.get(name).float() - base.get(name).float()
            total += float(delta.square().sum())
            if (
                delta.ndim != 2
                or Checkpoint.layer_index(name) is None
                or (targets is not None and _module_name(name) not in targets)
            ):
                continue
            u, s, v = torch.svd_lowrank(delta, q=min(rank, *delta.shape), niter=4)
            root = s.sqrt()
            modules[name] = (
                LoraFactors(down=(v * root).T.contiguous(), up=u * root, scale=1.0),
                False,
            )
            kept += float(s.square().sum())
    if not modules:
        raise CheckpointError(
            f"{tuned_dir}: no decoder-layer weight matched the target modules "
            f"{sorted(targets or [])}; it cannot be compressed into a LoRA adapter"
        )
    write_adapter(out_dir, modules, base_model_name_or_path=base_ref)
    return kept / total if total > 0 else 1.0


def _copy_adapter(source: Path, base: Checkpoint, out_dir: Path) -> int:
    """Copy a LoRA adapter once every module fits ``base``; return its (largest) rank."""
    with LoraAdapter.open(source) as adapter:
        for name in adapter.modules:
            info = base.tensors.get(name)
            if info is None:
                raise CheckpointError(
                    f"{source}: the adapter adapts {name!r}, which the base {base.path} does not "
                    f"have: it was trained for another base model (it names "
                    f"{adapter.base_model_name_or_path!r}); pass adapters of the base given by "
                    "--base"
                )
            adapter.delta(name, info.shape)  # a ShapeMismatchError names both shapes
        rank = max(module.rank for module in adapter.modules.values())
    out_dir.mkdir(parents=True)
    for file in (ADAPTER_CONFIG, ADAPTER_SAFETENSORS, ADAPTER_BIN):
        if (source / file).is_file():
            shutil.copy2(source / file, out_dir / file)
    return rank


def _shape(adapter_dir: Path) -> tuple[set[int], set[str]]:
    """An adapter's ranks and the module names it targets."""
    with LoraAdapter.open(adapter_dir) as adapter:
        return (
            {module.rank for module in adapter.modules.values()},
            {_module_name(name) for name in adapter.modules},
        )


def _check_arrow_fits(directory: Path, adapters: Sequence[str]) -> None:
    """Arrow stacks the experts' factors: one rank, one set of target modules for all."""
    shapes = {path: _shape(directory / path) for path in adapters}
    if len({(tuple(r), tuple(sorted(m))) for r, m in shapes.values()}) > 1 or any(
        len(ranks) > 1 for ranks, _ in shapes.values()
    ):
        described = "; ".join(
            f"{path}: rank {'/'.join(map(str, sorted(r)))} on {', '.join(sorted(m))}"
            for path, (r, m) in shapes.items()
        )
        raise CheckpointError(
            f"--router arrow needs experts of one rank on one set of modules, and these differ "
            f"({described}). Give full fine-tunes the LoRA experts' rank with --rank, or use "
            "--router prompt, which takes any mix."
        )


def calibration_tasks(
    experts: Sequence[str], calibration: Sequence[str | Path], rows: int
) -> list[Task]:
    """The first ``rows`` rows of each expert's calibration file: ``calibration``, in the order
    of ``experts``, or for a zoo expert (``zoo:<task>``, ``zoo:<task>-lora``) its train split."""
    if calibration and len(calibration) != len(experts):
        raise TaskError(
            f"{len(calibration)} --calibration file(s) for {len(experts)} --expert(s): give one "
            "per expert, in the same order"
        )
    files: list[Path] = []
    for k, ref in enumerate(experts):
        if calibration:
            files.append(Path(calibration[k]))
        elif ref.startswith("zoo:"):
            files.append(task_files("train", [expert_name(ref)])[0])
        else:
            raise TaskError(
                f"expert {ref!r} has no calibration rows: the prompt router needs a few prompts "
                "per expert; give --calibration FILE.csv once per --expert, in the same order "
                "(zoo experts default to their task's train split)"
            )
    tasks = []
    for path in files:
        task = load_task(path, limit=rows)
        if len(task.examples) < rows:
            raise TaskError(
                f"{path}: {len(task.examples)} row(s), fewer than the {rows} calibration rows "
                "asked for; pass a file with more rows or a smaller --calibration-rows"
            )
        tasks.append(replace(task, path=path))
    return tasks


def calibrate(base_dir: Path, tasks: Sequence[Task], *, batch_size: int = 8) -> torch.Tensor:
    """One unit centroid per task (K × hidden): the normalized mean of its prompts' embeddings
    (``prompt_embeddings``) under the base, the prompts rendered as ``mergearena eval`` renders
    them with the task's own settings."""
    # models.routed imports transformers (its cache class): only when calibrating.
    from mergearena.models.routed import prompt_embeddings

    lm = LanguageModel(load_model(base_dir, torch.float32), load_tokenizer(base_dir))
    centroids = []
    with torch.inference_mode():
        for task in tasks:
            rule, cot, shots = choose_strategy(task)
            chat = task.settings.chat_template
            prompts = [
                render_prompt(lm, task, e, chat, rule=rule, shots=shots[e.eval_type], cot=cot)
                for e in task.examples
            ]
            encoded = encode_prompts(lm, prompts, special_tokens=not chat)
            embeddings = []
            for start in range(0, len(encoded), batch_size):
                rows = encoded[start : start + batch_size]
                width = max(len(row) for row in rows)
                ids = torch.full((len(rows), width), lm.tokenizer.pad_token_id)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for i, row in enumerate(rows):  # left padded, as the scorer pads prompts
                    ids[i, width - len(row) :] = torch.tensor(row)
                    mask[i, width - len(row) :] = 1
                embeddings.append(prompt_embeddings(lm.model.base_model, ids, mask))
            centroid = torch.cat(embeddings).mean(0)
            centroids.append(torch.nn.functional.normalize(centroid, dim=0))
    return torch.stack(centroids)


def build_routed(
    base: str,
    experts: Sequence[str],
    out: str | Path,
    *,
    router: str = "prompt",
    calibration: Sequence[str | Path] = (),
    calibration_rows: int = 8,
    rank: int | None = None,
    top_k: int | None = None,
    temperature: float = 1.0,
    general: Sequence[str] = (),
    rng_seed: int | None = 0,
    overwrite: bool = False,
    allow_download: bool = False,
) -> Manifest:
    """Write a routed model to ``out`` (see ``checkpoints.routed``) and return its manifest.

    ``experts`` are model references: LoRA adapters, or full fine-tunes of ``base`` compressed to
    ``rank`` (default: the first LoRA expert's rank, else 16) on the LoRA experts' target modules
    (else every linear weight of the decoder layers). ``router`` is ``prompt`` (calibrated on
    ``calibration_rows`` rows per expert, see ``calibration_tasks``) or ``arrow`` (``top_k``, by
    default 3 or the number of experts if fewer; ``temperature``; ``general`` adapters turn on
    GenKnowSub).
    """
    if router not in ROUTERS:
        known = ", ".join(f"{kind} ({what})" for kind, what in ROUTERS.items())
        raise CheckpointError(f"unknown router {router!r}; use one of {known}")
    if not experts:
        raise CheckpointError("a routed model needs at least one --expert")
    names = [expert_name(ref) for ref in experts]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CheckpointError(
            f"experts share the name {repeated[0]!r} (from their references); give them "
            "directories of distinct names"
        )
    top_k = min(3, len(experts)) if top_k is None else top_k  # 3: PEFT's default
    if router == "arrow" and not 1 <= top_k <= len(experts):
        raise CheckpointError(f"--top-k {top_k}: choose from 1 to {len(experts)}, the experts")
    if general and router != "arrow":
        raise CheckpointError("general adapters (GenKnowSub) are for --router arrow only")
    for option, value, low in (("--rank", rank, 1), ("--calibration-rows", calibration_rows, 1)):
        if value is not None and value < low:
            raise CheckpointError(f"{option} {value}: it must be at least {low}")
    if temperature <= 0:
        raise CheckpointError(f"--temperature {temperature}: it must be above 0")
    tasks = calibration_tasks(experts, calibration, calibration_rows) if router == "prompt" else []
    base_dir = resolve_model_ref(base, allow_download=allow_download)
    # A local base is recorded absolute, so the routed model loads from anywhere.
    local = Path(base).expanduser()
    base_ref = str(local.resolve()) if local.is_dir() else base
    sources = [resolve_model_ref(ref, allow_download=allow_download) for ref in experts]
    adapters = [source for source in sources if is_adapter_dir(source)]
    targets, lora_rank = (None, None)
    if adapters:
        ranks, modules = _shape(adapters[0])
        targets, lora_rank = modules, max(ranks)
    rank = rank or lora_rank or DEFAULT_RANK

    entries: list[Expert] = []
    with Checkpoint.open(base_dir) as base_checkpoint, atomic_directory(out, overwrite) as staging:
        if base_checkpoint.config.get("is_encoder_decoder"):
            raise CheckpointError(f"{base}: routed models need a decoder-only base model")
        for ref, name, source in zip(experts, names, sources, strict=True):
            path = f"experts/{name}"
            if is_adapter_dir(source):
                own_rank = _copy_adapter(source, base_checkpoint, staging / path)
                entries.append(Expert(name=name, adapter=path, source=ref, rank=own_rank))
            else:
                captured = compress_fine_tune(
                    base_checkpoint,
                    source,
                    staging / path,
                    rank=rank,
                    targets=targets,
                    base_ref=base_ref,
                )
                entries.append(
                    Expert(name=name, adapter=path, source=ref, rank=rank, captured=captured)
                )
        if router == "arrow":
            general_paths = []
            for ref in general:
                path = f"general/{expert_name(ref)}"
                _copy_adapter(
                    resolve_model_ref(ref, allow_download=allow_download),
                    base_checkpoint,
                    staging / path,
                )
                general_paths.append(path)
            _check_arrow_fits(staging, [e.adapter for e in entries] + general_paths)
            settings: ArrowRouter | PromptRouter = ArrowRouter(
                kind="arrow",
                top_k=top_k,
                temperature=temperature,
                general=general_paths,
                rng_seed=rng_seed,
            )
        else:
            save_safetensors({"centroids": calibrate(base_dir, tasks)}, staging / CENTROIDS)
            settings = PromptRouter(
                kind="prompt",
                calibration_rows=calibration_rows,
                calibration={n: str(t.path) for n, t in zip(names, tasks, strict=True)},
            )
        manifest = Manifest(base=base_ref, experts=entries, router=settings)
        manifest.write(staging)
    return manifest
