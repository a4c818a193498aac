"""The merge engine: recipe → plan → stream tensors → method → write.

Everything that can fail on the inputs' metadata (references, architectures, tensor names and
shapes, parameter values per tensor) is checked while planning, before any tensor is read. Then
tensors stream one at a time: a reader thread loads the next tensor's inputs while the current one
is merged, and a writer thread appends the previous result to a safetensors shard whose header was
written up front. Peak memory is a few tensors, not a model. Output goes to a temporary directory
that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import torch

from mergearena.checkpoints import (
    Checkpoint,
    LoraAdapter,
    StreamingShardWriter,
    atomic_directory,
    copy_support_files,
    is_adapter_dir,
    resolve_model_ref,
    write_adapter,
)
from mergearena.checkpoints.refs import split_adapter_ref
from mergearena.checkpoints.staging import Stager
from mergearena.checkpoints.writer import check_output_location
from mergearena.errors import (
    CheckpointError,
    MergeArenaError,
    MergeError,
    RecipeError,
    ShapeMismatchError,
    shorten,
)
from mergearena.malloc import tune_cpu_allocator
from mergearena.methods import LoraFactors, MethodSpec
from mergearena.recipe import Recipe, evaluate_setting, parse_recipe

RECIPE_FILE = "mergearena_recipe.yaml"


@dataclass
class Source:
    """Where one model's tensors come from: a checkpoint, or a base checkpoint plus an adapter."""

    ref: str
    checkpoint: Checkpoint
    adapter: LoraAdapter | None = None

    @property
    def support_dir(self) -> Path:
        """The directory holding this model's config and tokenizer."""
        return self.checkpoint.path

    def changes(self, name: str) -> bool:
        """Whether this source's tensor ``name`` differs from its checkpoint's (an adapter's)."""
        return self.adapter is not None and (
            name in self.adapter.target_weight_names() or self.adapter.full_tensor(name) is not None
        )

    def read(self, name: str, cache: dict[tuple, torch.Tensor]) -> torch.Tensor:
        """The tensor ``name`` of this model: the checkpoint's, or with the adapter's change in
        float32 (rounding ``base + delta`` back to a bf16 base would lose most of a small delta
        before the method sees it)."""
        key = (id(self.checkpoint), name)
        if key not in cache:
            cache[key] = self.checkpoint.get(name)
        tensor = cache[key]
        if self.adapter is not None:
            # PEFT saves a full copy of modules it trains outright (modules_to_save, and the
            # embedding when embeddings are LoRA targets); the LoRA delta adds on top of either.
            replacement = self.adapter.full_tensor(name)
            if replacement is not None:
                tensor = replacement
            delta = self.adapter.delta(name, tuple(tensor.shape))
            if delta is not None:  # float32, or the base's dtype if that is wider
                dtype = torch.promote_types(delta.dtype, tensor.dtype)
                if replacement is None and tensor.dtype != dtype:  # converted once for all experts
                    if (*key, dtype) not in cache:
                        cache[(*key, dtype)] = tensor.to(dtype)
                    tensor = cache[(*key, dtype)]
                tensor = delta.to(dtype).add_(tensor)
        return tensor


@dataclass
class TensorTask:
    """One output tensor: its name, shape, dtype and the method's arguments resolved for it."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    arguments: dict[str, Any]
    merge: bool  # False: copy the reference tensor (non-float tensors)
    # Every input is the base's own tensor (what a LoRA expert leaves untouched): every method's
    # result is then the base exactly (their degenerate cases), so the base is copied.
    unchanged: bool = False


@dataclass
class MergePlan:
    recipe: Recipe
    method: MethodSpec
    base: Source | None
    inputs: list[Source]
    reference: Source
    tasks: list[TensorTask] = field(default_factory=list)
    tokenizer: Source | None = None  # tokenizer_source, when it names a model

    @property
    def total_bytes(self) -> int:
        return sum(_nbytes(task.shape, task.out_dtype) for task in self.tasks)


@dataclass(frozen=True)
class MergeResult:
    out: Path
    tensors: int
    bytes: int
    seconds: float


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


Resolver = Callable[[str], Path]
"""A model reference's local directory, or an error: ``resolve_model_ref``, or a policy's."""


class _Opener:
    """Opens each checkpoint once, however many recipe entries refer to it. Every reference it
    meets, in any position, goes through ``resolver``: this is the one walk over a recipe's
    models, so a policy passed as the resolver sees them all."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.checkpoints: dict[Path, Checkpoint] = {}

    def resolve(self, ref: str) -> Path:
        return Path(self.resolver(ref)).resolve()

    def checkpoint(self, ref: str, path: Path | None = None) -> Checkpoint:
        path = path or self.resolve(ref)
        if path not in self.checkpoints:
            if is_adapter_dir(path):
                raise RecipeError(
                    f"{ref} is a LoRA adapter, not a model; it cannot be a base model"
                )
            self.checkpoints[path] = Checkpoint.open(path)
        return self.checkpoints[path]

    def source(self, ref: str, base_ref: str | None) -> Source:
        try:
            return self._source(ref, base_ref)
        except OSError as error:  # a name too long, a directory we may not read...
            raise CheckpointError(_os_error_message(f"model {shorten(ref)}", error)) from None

    def _source(self, ref: str, base_ref: str | None) -> Source:
        model_ref, adapter_ref = split_adapter_ref(ref)
        if adapter_ref is not None:  # mergekit's "model+adapter" syntax
            checkpoint = self.checkpoint(model_ref)
            return Source(ref, checkpoint, LoraAdapter.open(self.resolve(adapter_ref)))
        path = self.resolve(ref)
        if is_adapter_dir(path):
            adapter = LoraAdapter.open(path)
            adapter_base = base_ref or adapter.base_model_name_or_path
            if not adapter_base:
                raise RecipeError(
                    f"{ref} is a LoRA adapter that names no base model; set 'base_model' in the "
                    f"recipe (or write it as 'BASE+{ref}')"
                )
            return Source(ref, self.checkpoint(adapter_base), adapter)
        return Source(ref, self.checkpoint(ref, path))

    def close(self) -> None:
        for checkpoint in self.checkpoints.values():
            checkpoint.close()


def _os_error_message(what: str, error: OSError) -> str:
    filename = "" if error.filename is None else shorten(str(error.filename))
    where = f" at {filename}" if filename else ""
    return (
        f"{what}: cannot read it ({error.strerror or error}{where}); check that the path is "
        "right and readable by this user"
    )


def _check_compatible(reference: Source, others: list[Source]) -> None:
    """Every input has the reference's architecture and exactly its tensor names and shapes."""
    ref_config = reference.checkpoint.config
    for source in others:
        config = source.checkpoint.config
        for key in ("model_type", "architectures"):
            if ref_config.get(key) and config.get(key) and ref_config[key] != config[key]:
                raise ShapeMismatchError(
                    f"architectures differ: {reference.ref} has {key} {ref_config[key]!r} but "
                    f"{source.ref} has {config[key]!r}; only models of one architecture merge"
                )
        ref_tensors = reference.checkpoint.tensors
        tensors = source.checkpoint.tensors
        missing = [name for name in ref_tensors if name not in tensors]
        extra = [name for name in tensors if name not in ref_tensors]
        if missing or extra:
            parts = []
            if missing:
                parts.append(
                    f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
                )
            if extra:
                parts.append(f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
            raise ShapeMismatchError(
                f"{source.ref} ({source.checkpoint.path}) does not have the tensors of "
                f"{reference.ref}: {'; '.join(parts)}"
            )
        for name, info in ref_tensors.items():
            other = tensors[name]
            if tuple(other.shape) != tuple(info.shape):
                hint = (
                    " (vocabulary sizes differ: pick models with the same tokenizer)"
                    if "embed" in name or "lm_head" in name or "wte" in name
                    else ""
                )
                raise ShapeMismatchError(
                    f"tensor {name} has shape {tuple(info.shape)} in {reference.ref} but "
                    f"{tuple(other.shape)} in {source.ref}{hint}"
                )
    for source in [reference, *others]:  # the reference's own adapter too
        _check_adapter_targets(source)


def _check_adapter_targets(source: Source) -> None:
    """A LoRA adapter adapts only tensors its base model has (otherwise its delta would be
    silently dropped): the modules it targets and the full tensors it carries."""
    if source.adapter is None:
        return
    tensors = source.checkpoint.tensors
    unknown = sorted(
        (source.adapter.target_weight_names() | set(source.adapter.full_tensors)) - set(tensors)
    )
    if unknown:
        raise ShapeMismatchError(
            f"LoRA adapter {source.ref} targets {unknown[0]}, which its base model "
            f"({source.checkpoint.path}) does not have; is it an adapter for another base model?"
        )


def _coerce(kind: type, value: Any) -> Any:
    if kind is float and isinstance(value, int | str) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float | str):
        return int(float(value))
    return value


def _arguments_for(
    recipe: Recipe, method: MethodSpec, name: str, fraction: float
) -> dict[str, Any]:
    """The method's keyword arguments for tensor ``name`` at layer fraction ``fraction``."""
    entries = recipe.inputs()
    arguments: dict[str, Any] = {}
    for parameter in method.parameters:
        if parameter.per_model:
            values = []
            for entry in entries:
                setting = entry.parameters.get(
                    parameter.name, recipe.parameters.get(parameter.name)
                )
                value = None if setting is None else evaluate_setting(setting, name, fraction)
                if value is None:
                    if parameter.required:
                        raise RecipeError(
                            f"no value of {parameter.name!r} for {entry.model} applies to tensor "
                            f"{name}: add a condition without 'filter' as a fallback"
                        )
                    value = parameter.default
                values.append(_coerce(parameter.kind, value))
            arguments[parameter.argument] = values
        else:
            setting = recipe.parameters.get(parameter.name)
            value = None if setting is None else evaluate_setting(setting, name, fraction)
            if value is None:
                if parameter.required:
                    raise RecipeError(
                        f"no value of {parameter.name!r} applies to tensor {name}: add a "
                        f"condition without 'filter' as a fallback"
                    )
                value = parameter.default
            arguments[parameter.argument] = _coerce(parameter.kind, value)
    return arguments


def plan_merge(
    recipe: Recipe, *, resolve: Resolver | None = None, allow_download: bool = False
) -> tuple[MergePlan, _Opener]:
    """Resolve and open every input and work out each output tensor; reads no tensor data.

    Every model reference the merge will use, wherever it appears (``base_model``, a model or
    either half of ``MODEL+ADAPTER``, the base an adapter's config names, ``tokenizer_source``),
    goes through ``resolve``: ``resolve_model_ref`` (with ``allow_download``) by default, or a
    caller's, such as the arena's model policy, whose refusal stops the merge before it starts.
    """
    method = recipe.method
    opener = _Opener(resolve or (lambda ref: resolve_model_ref(ref, allow_download=allow_download)))
    try:
        base = (
            opener.source(recipe.base_model, None)
            if method.base != "none" and recipe.base_model is not None
            else None
        )
        if base is not None and base.adapter is not None:
            raise RecipeError(
                f"base_model {recipe.base_model} must be a full model, not an adapter"
            )
        inputs = [opener.source(entry.model, recipe.base_model) for entry in recipe.inputs()]
        reference = base or inputs[0]
        _check_compatible(reference, [s for s in inputs if s is not reference])
        plan = MergePlan(recipe, method, base, inputs, reference)
        if recipe.tokenizer_source not in (None, "base"):
            plan.tokenizer = opener.source(recipe.tokenizer_source, recipe.base_model)
        if method.output == "adapter":
            return plan, opener
        checkpoint = reference.checkpoint
        layers = checkpoint.num_layers
        if recipe.layer_range is not None and layers is not None:
            if tuple(recipe.layer_range) != (0, layers):
                raise RecipeError(
                    f"slices: layer_range {list(recipe.layer_range)} does not cover all {layers} "
                    f"layers of {reference.ref}; partial ranges (layer stacking) are not supported"
                )
        out_dtype = recipe.output_dtype()
        for name, info in checkpoint.tensors.items():
            layer = checkpoint.layer_index(name)
            if layer is None or not layers:
                fraction = 0.0
            else:
                fraction = layer / (layers - 1) if layers > 1 else 1.0
            merge = info.dtype.is_floating_point
            plan.tasks.append(
                TensorTask(
                    name=name,
                    shape=tuple(info.shape),
                    out_dtype=(out_dtype or info.dtype) if merge else info.dtype,
                    arguments=_arguments_for(recipe, method, name, fraction) if merge else {},
                    merge=merge,
                    unchanged=base is not None
                    and all(
                        source.checkpoint is base.checkpoint and not source.changes(name)
                        for source in inputs
                    ),
                )
            )
        return plan, opener
    except BaseException:
        opener.close()
        raise


def _finite_flag(tensor: torch.Tensor) -> torch.Tensor:
    """A one-element bool tensor on the tensor's device: whether no element is NaN or ±Inf.

    The smallest and largest elements are finite exactly when every element is (a NaN makes both
    NaN), found in one reduction queued on the device without waiting for it; ``aminmax`` reads
    bf16 as fast as any reduction, where a float32 ``sum`` of bf16 was 20× slower on a CPU.
    """
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    return torch.isfinite(torch.stack(torch.aminmax(tensor))).all()


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether no element is NaN or ±Inf (``_finite_flag``, waited for)."""
    return bool(_finite_flag(tensor))


def _blame_non_finite(
    inputs: Iterable[tuple[Path | str, bool]],
    *,
    method: str,
    part: str,
    kind: str,
    result: str,
    remedy: str,
) -> NoReturn:
    """Stop a merge whose result holds NaN or Inf, saying whose fault it is.

    ``inputs`` yields each input's file and whether its ``part`` (a tensor, an adapter's factors)
    is finite, in order; it is only consumed up to the first that is not, so a generator reads
    the inputs again only as far as needed. An input with NaN or Inf is a corrupt or diverged
    ``kind`` (``CheckpointError``); when every input is finite the method produced them
    (``MergeError``), and ``remedy`` says what to change.
    """
    for where, finite in inputs:
        if not finite:
            raise CheckpointError(
                f"{part} in {where} contains NaN or Inf values; the {kind} is corrupt or "
                f"diverged, so it cannot be merged"
            )
    raise MergeError(
        f"{method} produced NaN or Inf in {result}, from finite inputs; nothing was written. "
        f"Change {remedy} or use another method; if they are sound, this is a bug in {method}: "
        f"please report it with the recipe"
    )


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator seeded by the recipe seed and the tensor name: results do not depend on order."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return generator


_CUDA_READ_AHEAD = 3  # tasks whose inputs are on their way to the GPU while one is merged
_CUDA_WRITERS = 4  # results on their way back, each to its place in the output (file writes
# are the slowest step of a GPU merge: one thread writes about 2.4 GB/s into /dev/shm)


class _Executor:
    def __init__(self, plan: MergePlan, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self.compute_dtype = plan.recipe.compute_dtype()

    def sources(self, task: TensorTask) -> list[Source]:
        """What ``task`` reads: the reference alone for a copied tensor, else the base (when the
        method takes one) followed by every input; ``arrange`` takes them apart again."""
        if not task.merge or task.unchanged:
            return [self.plan.reference]
        return ([self.plan.base] if self.plan.base is not None else []) + self.plan.inputs

    def arrange(
        self, task: TensorTask, tensors: list[torch.Tensor]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """``sources(task)``'s tensors as ``(base, inputs)``; a copied tensor is the base."""
        if not task.merge or task.unchanged:
            return tensors[0], []
        if self.plan.base is None:
            return None, tensors
        return tensors[0], tensors[1:]

    def to_compute(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.compute_dtype)
        return tensor

    def read(self, task: TensorTask) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """A task's tensors read on the CPU (each checkpoint's once), then moved to the device."""
        cache: dict = {}
        tensors = [source.read(task.name, cache) for source in self.sources(task)]
        if task.merge:
            tensors = [
                self.to_compute(tensor).to(self.device, non_blocking=True) for tensor in tensors
            ]
        return self.arrange(task, tensors)

    def check_output(
        self, task: TensorTask, finite: torch.Tensor | None, output: torch.Tensor
    ) -> None:
        """Stop the merge if the output tensor (about to be written) is not finite.

        ``finite`` is the flag ``compute`` queued with the result (``_finite_flag``); only when it
        is false are the inputs read again to say whose fault it is: a NaN or Inf in an input is a
        corrupt checkpoint, otherwise the method produced it.
        """
        if finite is None or bool(finite):
            return
        bad = int((~torch.isfinite(output)).sum())
        _blame_non_finite(
            self.finite_inputs(task.name),
            method=self.plan.method.name,
            part=f"tensor {task.name}",
            kind="checkpoint",
            result=f"{bad} of {output.numel()} values of tensor {task.name}",
            remedy=f"the method's parameters for this tensor (weights summing to zero, a lambda "
            f"or scale that overflows {task.out_dtype})",
        )

    def finite_inputs(self, name: str) -> Iterator[tuple[Path, bool]]:
        """Each merged input's file and whether its tensor ``name`` is finite, read again: a
        checkpoint's own tensor first, then with its adapter's change (blamed on the adapter)."""
        sources = ([self.plan.base] if self.plan.base is not None else []) + self.plan.inputs
        for source in sources:
            yield source.checkpoint.tensors[name].file, _all_finite(source.checkpoint.get(name))
            if source.adapter is not None:
                yield source.adapter.path, _all_finite(source.read(name, {}))

    def compute(
        self, task: TensorTask, base: torch.Tensor | None, inputs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output tensor, and (for merged tensors) a queued flag: is it finite."""
        if not task.merge:  # a non-float tensor, copied
            assert base is not None
            return base, None
        if task.unchanged:  # the base's own tensor in every input, copied (checked like a result)
            assert base is not None
            result = base.to(task.out_dtype)
            return result, _finite_flag(result)
        method = self.plan.method
        arguments = dict(task.arguments)
        if base is not None:
            arguments["base"] = base
        if method.random:
            arguments["generator"] = _generator(self.plan.recipe.seed, task.name, self.device)
        try:
            result = method.function(inputs, **arguments)
        except ValueError as error:  # a parameter value the method cannot use for this tensor
            raise RecipeError(f"{method.name} cannot merge tensor {task.name}: {error}") from None
        if tuple(result.shape) != task.shape:
            raise RuntimeError(
                f"{method.name} returned shape {tuple(result.shape)} for {task.name}, "
                f"expected {task.shape}"
            )
        result = result.to(task.out_dtype)
        return result, _finite_flag(result)


class _Arrival:
    """A task's inputs on their way to the GPU: ``result()`` makes the current stream wait for
    them and returns ``(base, inputs)`` in the compute dtype."""

    def __init__(self, executor: _Executor, task: TensorTask, futures: list[Future]) -> None:
        self.executor, self.task, self.futures = executor, task, futures

    def result(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        current = torch.cuda.current_stream(self.executor.device)
        tensors = []
        for future in self.futures:
            tensor, uploaded = future.result()
            if uploaded is not None:  # on the GPU, written by a reader's stream
                current.wait_event(uploaded)
                tensor.record_stream(current)
            tensors.append(self.executor.to_compute(tensor) if self.task.merge else tensor)
        return self.executor.arrange(self.task, tensors)


class _CudaReader:
    """Reads tasks' inputs on several threads at once, each streaming checkpoint bytes from the
    file straight into its own pinned buffers and on to the GPU (``Stager``): no pageable copy,
    no dtype conversion on the CPU, and the GPU never waits for the whole tensor to be on the
    host. A tensor several inputs share (the base's, in a LoRA expert) is read once."""

    def __init__(self, executor: _Executor) -> None:
        self.executor = executor
        self.pool = ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 1)), "mergearena-read-cuda")
        self.local = threading.local()

    def _stager(self) -> Stager:
        stager = getattr(self.local, "stager", None)
        if stager is None:
            stager = self.local.stager = Stager(self.executor.device)
        return stager

    def _upload(self, source: Source, name: str) -> tuple[torch.Tensor, torch.cuda.Event]:
        checkpoint = source.checkpoint
        if source.changes(name) or not checkpoint.reads_bytes(name):
            # An adapter's change is added on the CPU, in float32; a .bin tensor comes whole.
            tensor = source.read(name, {}).contiguous()
            raw = tensor.reshape(-1).view(torch.uint8)
            dtype, shape = tensor.dtype, tuple(tensor.shape)

            def fill(buffer: torch.Tensor, start: int) -> None:
                buffer.copy_(raw[start : start + len(buffer)])

        else:
            info = checkpoint.tensors[name]
            raw, dtype, shape = None, info.dtype, tuple(info.shape)

            def fill(buffer: torch.Tensor, start: int) -> None:
                checkpoint.read_into(name, buffer.numpy().data, start)

        nbytes = math.prod(shape) * dtype.itemsize
        data, uploaded = self._stager().upload(nbytes, fill)
        return data.view(dtype).reshape(shape), uploaded

    def submit(self, task: TensorTask) -> _Arrival:
        if not task.merge:  # a non-float tensor is copied on the CPU
            reference = self.executor.plan.reference
            future = self.pool.submit(lambda: (reference.read(task.name, {}), None))
            return _Arrival(self.executor, task, [future])
        shared: dict[int, Future] = {}
        futures = []
        for source in self.executor.sources(task):
            key = id(source) if source.changes(task.name) else id(source.checkpoint)
            if key not in shared:
                shared[key] = self.pool.submit(self._upload, source, task.name)
            futures.append(shared[key])
        return _Arrival(self.executor, task, futures)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _stream(
    plan: MergePlan,
    device: torch.device,
    writer: StreamingShardWriter,
    advance: Callable[[int], None],
) -> None:
    """Read ahead, merge the current tensor, write the previous one: all three overlap.

    On the CPU one thread reads the next tensor's inputs and one writes the previous result. On a
    GPU several threads stream the next few tensors' inputs to it through pinned buffers, the
    merge is queued on the current stream with no host sync, and several writer threads bring
    results back through their own pinned buffers, once the event recorded after each has
    passed, and write them to their places in the output.
    """
    executor = _Executor(plan, device)
    tasks = plan.tasks
    on_cuda = device.type == "cuda"
    if on_cuda:
        cuda_reader = _CudaReader(executor)
        read: Callable[[TensorTask], Any] = cuda_reader.submit
        ahead = _CUDA_READ_AHEAD
    else:
        cpu_reader = ThreadPoolExecutor(1, "mergearena-read")

        def read_on_cpu(task: TensorTask) -> Future:
            return cpu_reader.submit(executor.read, task)

        read = read_on_cpu
        ahead = 1
    writers = _CUDA_WRITERS if on_cuda else 1
    local = threading.local()  # each writer thread's Stager, made there on first use

    def write(
        task: TensorTask,
        tensor: torch.Tensor,
        finite: torch.Tensor | None,
        ready: torch.cuda.Event | None,
    ) -> None:
        if tensor.device.type == "cuda":
            if not hasattr(local, "stager"):
                local.stager = Stager(device)
            stager = local.stager
            flag = None if finite is None else stager.fetch(finite, ready)
            executor.check_output(task, flag, tensor)
            writer.write(
                task.name, tensor, download=lambda t, sink: stager.download(t, ready, sink)
            )
        else:
            output = tensor.cpu()
            executor.check_output(task, finite, output)
            writer.write(task.name, output)
        advance(_nbytes(task.shape, task.out_dtype))

    try:
        with ThreadPoolExecutor(writers, "mergearena-write") as writer_pool:
            writing: deque[Future[None]] = deque()
            arriving = deque(read(task) for task in tasks[:ahead])
            for index, task in enumerate(tasks):
                base, inputs = arriving.popleft().result()
                if index + ahead < len(tasks):
                    arriving.append(read(tasks[index + ahead]))
                result, finite = executor.compute(task, base, inputs)
                ready = None
                if on_cuda:
                    ready = torch.cuda.Event(blocking=True)
                    ready.record()
                del base, inputs
                if len(writing) == writers:
                    writing.popleft().result()
                writing.append(writer_pool.submit(write, task, result, finite, ready))
                del result, finite
            for written in writing:
                written.result()
    finally:
        if on_cuda:
            cuda_reader.close()
        else:
            cpu_reader.shutdown(wait=True, cancel_futures=True)


def _model_card(plan: MergePlan) -> str:
    recipe = plan.recipe
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, mergearena]",
    ]
    if plan.base is not None:
        lines.append(f"base_model: {plan.base.ref}")
    lines += [
        "---",
        "",
        f"# {recipe.name or 'Merged model'}",
        "",
        f"Merged with [mergearena](https://pypi.org/project/mergearena/) using "
        f"**{plan.method.name}** ({plan.method.reference}).",
        "",
        "## Inputs",
        "",
    ]
    if plan.base is not None:
        lines.append(f"- base model: `{plan.base.ref}` ({plan.base.checkpoint.path})")
    for source in plan.inputs:
        where = source.adapter.path if source.adapter is not None else source.checkpoint.path
        kind = f"LoRA adapter on `{source.checkpoint.path}`" if source.adapter else "model"
        lines.append(f"- `{source.ref}`: {kind} ({where})")
    lines += ["", "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)


def _write_support_files(plan: MergePlan, directory: Path) -> None:
    support = (plan.tokenizer or plan.reference).support_dir
    copy_support_files(plan.reference.support_dir, directory, config=True, tokenizer=False)
    copy_support_files(support, directory, config=False, tokenizer=True)
    config_path = directory / "config.json"
    out_dtype = plan.recipe.output_dtype()
    if config_path.exists() and out_dtype is not None:
        config = json.loads(config_path.read_text())
        name = str(out_dtype).removeprefix("torch.")
        config["torch_dtype"] = name
        if "dtype" in config:  # transformers 5 writes "dtype"
            config["dtype"] = name
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    (directory / "README.md").write_text(_model_card(plan))
    (directory / RECIPE_FILE).write_text(plan.recipe.to_yaml())


def _merge_adapters(plan: MergePlan, directory: Path) -> tuple[int, int]:
    """Adapter-space merge: every input is a LoRA adapter; the output is one adapter."""
    not_adapters = [source.ref for source in plan.inputs if source.adapter is None]
    if not_adapters:
        raise RecipeError(
            f"{plan.method.name} merges LoRA adapters into one adapter; {not_adapters[0]} is not a "
            f"LoRA adapter (use a full-weight method such as task_arithmetic for full models)"
        )
    adapters = [source.adapter for source in plan.inputs if source.adapter is not None]
    names = sorted(set().union(*(adapter.target_weight_names() for adapter in adapters)))
    merged: dict[str, tuple[LoraFactors, bool]] = {}
    total = 0
    for name in names:
        present = [i for i, adapter in enumerate(adapters) if name in adapter.target_weight_names()]
        arguments = _arguments_for(plan.recipe, plan.method, name, 0.0)
        for key, value in arguments.items():
            if isinstance(value, list):
                arguments[key] = [value[i] for i in present]
        factors = [adapters[i].factors(name) for i in present]
        result = plan.method.function(factors, **arguments)
        if not (_all_finite(result.up) and _all_finite(result.down)):
            _blame_non_finite(
                (
                    (adapters[i].path, _all_finite(factor.up) and _all_finite(factor.down))
                    for i, factor in zip(present, factors, strict=True)
                ),
                method=plan.method.name,
                part=f"the LoRA pair of {name}",
                kind="adapter",
                result=f"the merged LoRA factors of {name}",
                remedy="the method's parameters (weights, rank)",
            )
        merged[name] = (result, adapters[present[0]].is_embedding(name))
        total += result.down.numel() + result.up.numel()
    fan_in_fan_out = {bool(adapter.config.get("fan_in_fan_out", False)) for adapter in adapters}
    if len(fan_in_fan_out) > 1:
        raise RecipeError(
            "the adapters disagree on fan_in_fan_out (Conv1D vs Linear layers): they are not "
            "adapters of one architecture"
        )
    base_ref = plan.recipe.base_model or adapters[0].base_model_name_or_path
    write_adapter(
        directory,
        merged,
        base_model_name_or_path=base_ref,
        extra_config={"fan_in_fan_out": fan_in_fan_out.pop()},
    )
    (directory / RECIPE_FILE).write_text(plan.recipe.to_yaml())
    (directory / "README.md").write_text(_model_card(plan))
    return len(names), total * 4


def merge_device(name: str) -> torch.device:
    """The device a merge runs on, ``cpu``, ``cuda`` or ``cuda:N``, checked before any work."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise MergeArenaError(f"device {shorten(repr(name))}: a merge runs on cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeArenaError(f"device {name!r} was asked for, but torch sees no CUDA GPU here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MergeArenaError(
                f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered "
                "from 0"
            )
    return device


def _check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise MergeArenaError(
            f"threads {threads}: use 1 or more (or leave it out: torch picks one per core)"
        )


def _input_directories(plan: MergePlan) -> list[tuple[str, Path]]:
    """Every directory the merge reads (and the recipe's file), with what the recipe calls it."""
    found: list[tuple[str, Path]] = []
    roles = [("base_model", plan.base), *(("model", s) for s in plan.inputs)]
    for role, source in [*roles, ("tokenizer_source", plan.tokenizer)]:
        if source is None:
            continue
        if source.adapter is None:
            found.append((f"{role} {source.ref}", source.checkpoint.path))
        else:
            found.append((f"{role} {source.ref} (a LoRA adapter)", source.adapter.path))
            found.append((f"{role} {source.ref}'s base model", source.checkpoint.path))
    if plan.recipe.source_file is not None:
        found.append((f"recipe {plan.recipe.source_file}", plan.recipe.source_file))
    return found


def _check_output_apart(out: Path, plan: MergePlan) -> None:
    """Refuse an output that is, holds or lies inside an input directory, compared as real paths
    (symlinks and ``..`` resolved): replacing it would destroy that model, with or without
    ``--force``, and writing beside or inside it would mix the output with it."""
    target = out.expanduser().resolve()
    for label, directory in _input_directories(plan):
        directory = directory.resolve()
        if target == directory:
            relation = "is"
        elif target.is_relative_to(directory):
            relation = "lies inside"
        elif directory.is_relative_to(target):
            relation = "contains"
        else:
            continue
        where = "" if str(directory) in label else f" ({shorten(str(directory))})"
        raise CheckpointError(
            f"the output {shorten(str(out))} {relation} the input {shorten(label)}{where}; "
            "writing it would replace or mix with that model, even with --force. Choose an "
            "output directory outside every input."
        )


def _check_config(plan: MergePlan) -> None:
    """A merged model takes its config.json from the reference model: without one, the output
    would be weights no loader can use."""
    reference, directory = plan.reference.ref, plan.reference.support_dir
    if not (directory / "config.json").is_file():
        where = "" if str(directory) == reference else f" (in {directory})"
        raise CheckpointError(
            f"{reference} has no config.json{where}, which the merged model's architecture is "
            "copied from; add the model's config.json (or make a model that has one the "
            "base_model or the first model)."
        )


def check_merge(
    recipe: Recipe,
    out: str | Path,
    *,
    device: str = "cpu",
    threads: int | None = None,
    overwrite: bool = False,
    allow_download: bool = False,
    resolve: Resolver | None = None,
) -> tuple[MergePlan, _Opener]:
    """Everything :func:`merge` checks before it writes anything (``--dry-run`` runs exactly
    this): the device and threads, every input (see :func:`plan_merge`), an output that does not
    touch an input, a config to copy, and a place ``out`` can be written. The caller closes the
    opener."""
    merge_device(device)
    _check_threads(threads)
    plan, opener = plan_merge(recipe, resolve=resolve, allow_download=allow_download)
    try:
        _check_output_apart(Path(out), plan)
        if plan.method.output != "adapter":
            _check_config(plan)
        check_output_location(out, overwrite=overwrite)
    except BaseException:
        opener.close()
        raise
    return plan, opener


def merge(
    recipe: str | Path | dict[str, Any] | Recipe,
    out: str | Path,
    *,
    device: str = "cpu",
    threads: int | None = None,
    overwrite: bool = False,
    allow_download: bool = False,
    resolve: Resolver | None = None,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = False,
) -> MergeResult:
    """Merge the models a recipe names and write a Hugging Face checkpoint (or adapter) to ``out``.

    ``recipe`` is a path to a YAML file, a YAML string, a dict, or a parsed :class:`Recipe`.
    The whole recipe and every input's metadata are validated before any tensor is read, and
    ``out`` appears only once complete. ``resolve`` finds each model (see :func:`plan_merge`).
    """
    started = time.perf_counter()
    parsed = recipe if isinstance(recipe, Recipe) else parse_recipe(recipe)
    out = Path(out)
    plan, opener = check_merge(
        parsed,
        out,
        device=device,
        threads=threads,
        overwrite=overwrite,
        allow_download=allow_download,
        resolve=resolve,
    )
    torch_device = merge_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    if torch_device.type == "cpu":
        tune_cpu_allocator()
    try:
        with atomic_directory(out, overwrite=overwrite) as directory:
            if plan.method.output == "adapter":
                count, nbytes = _merge_adapters(plan, directory)
            else:
                count, nbytes = len(plan.tasks), plan.total_bytes
                layout = [(task.name, task.shape, task.out_dtype) for task in plan.tasks]
                writer = StreamingShardWriter(
                    directory,
                    layout,
                    max_shard_bytes=max_shard_bytes,
                    metadata={"format": "pt", "merged_with": "mergearena"},
                )
                with _progress(progress, count, nbytes, plan.method.name) as advance:
                    _stream(plan, torch_device, writer, advance)
                writer.close()
                _write_support_files(plan, directory)
    finally:
        opener.close()
    return MergeResult(out, count, nbytes, time.perf_counter() - started)


class TensorCache:
    """Inputs kept in memory from one merge to the next, for ``merge_to_state_dict`` (a search
    merges the same models with other settings many times): each source's tensor as the merge
    reads it (an adapter's delta added to its base, converted to the compute dtype, on the
    device), until ``budget`` bytes are held; later tensors are read each time. Every method
    leaves its inputs unchanged (the registry's property test checks), so they can be shared."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0
        self._tensors: dict[tuple, torch.Tensor] = {}

    def read(self, executor: _Executor, task: TensorTask) -> tuple[torch.Tensor | None, list]:
        tensors = []
        for source in executor.sources(task):
            key = (
                source.ref,
                str(source.checkpoint.path),
                task.name,
                task.merge,
                executor.compute_dtype,
                executor.device,
            )
            tensor = self._tensors.get(key)
            if tensor is None:
                tensor = source.read(task.name, {})
                if task.merge:
                    tensor = executor.to_compute(tensor).to(executor.device)
                nbytes = tensor.numel() * tensor.element_size()
                if self.held + nbytes <= self.budget:
                    self._tensors[key] = tensor
                    self.held += nbytes
            tensors.append(tensor)
        return executor.arrange(task, tensors)


def merge_to_state_dict(
    recipe: str | Path | dict[str, Any] | Recipe,
    *,
    device: str = "cpu",
    cache: TensorCache | None = None,
    resolve: Resolver | None = None,
) -> dict[str, torch.Tensor]:
    """Merge as :func:`merge` does, tensor for tensor, but return the weights instead of writing
    them (a search's candidates never touch the disk). Full-weight methods only."""
    parsed = recipe if isinstance(recipe, Recipe) else parse_recipe(recipe)
    plan, opener = plan_merge(parsed, resolve=resolve)
    try:
        if plan.method.output == "adapter":
            raise RecipeError(
                f"{plan.method.name} writes a LoRA adapter; merging in memory needs a full-weight "
                f"method"
            )
        executor = _Executor(plan, torch.device(device))
        if executor.device.type == "cpu":
            tune_cpu_allocator()
        weights = {}
        for task in plan.tasks:
            base, inputs = (cache or TensorCache(0)).read(executor, task)
            result, finite = executor.compute(task, base, inputs)
            executor.check_output(task, finite, result)
            weights[task.name] = result
        return weights
    finally:
        opener.close()


class _progress:
    """A rich progress bar with tensors/s and bytes/s, or nothing."""

    def __init__(self, enabled: bool, tensors: int, nbytes: int, label: str) -> None:
        self.enabled, self.tensors, self.nbytes, self.label = enabled, tensors, nbytes, label

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda _nbytes: None
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[done]}/{task.fields[tensors]} tensors"),
            TextColumn("{task.fields[rate]:.1f} tensors/s"),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
        )
        self.bar.__enter__()
        started = time.perf_counter()
        task = self.bar.add_task(
            f"merging ({self.label})", total=self.nbytes, done=0, tensors=self.tensors, rate=0.0
        )
        done = 0
        lock = threading.Lock()  # writer threads report at once

        def advance(nbytes: int) -> None:
            nonlocal done
            with lock:
                done += 1
                rate = done / max(time.perf_counter() - started, 1e-9)
                self.bar.update(task, advance=nbytes, done=done, rate=rate)

        return advance

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.enabled:
            self.bar.__exit__(exc_type, exc, traceback)


def iter_output_tensors(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of a written checkpoint one at a time (for checks and tests)."""
    checkpoint = Checkpoint.open(Path(directory))
    try:
        for name in checkpoint.tensors:
            yield name, checkpoint.get(name)
    finally:
        checkpoint.close()
