"""Which models an arena job may use: the competition's allowlist and parameter limit.

The runner applies a ``ModelPolicy`` to every model a submission opens (the starter-kit layer
resolves the kit's model names through it too); the service and the worker check references
against the allowlist with ``is_listed`` before a job runs. The policy is a guard for honest code:
``model_mounts`` gives the worker the directories of the admitted models, the only ones a job's
sandbox mounts, so code that skips the policy finds no other model to open.
"""

from __future__ import annotations

import fnmatch
import glob
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mergearena.checkpoints import Checkpoint, is_adapter_dir, resolve_model_ref
from mergearena.checkpoints.lora import ADAPTER_BIN, ADAPTER_SAFETENSORS
from mergearena.checkpoints.refs import (
    ZOO_ADAPTER_SUFFIX,
    ZOO_BASE_NAME,
    ZOO_EXPERTS_DIR,
    ZOO_PREFIX,
    split_adapter_ref,
    zoo_expert_names,
    zoo_model_dir,
)
from mergearena.errors import CheckpointError, SubmissionError


def count_parameters(path: Path) -> int:
    """Parameters stored in a model or adapter directory, from its weight files' headers only."""
    from mergearena.checkpoints.routed import count_parameters as routed_parameters
    from mergearena.checkpoints.routed import is_routed_dir

    if is_routed_dir(path):  # the base and every expert adapter beside it
        return routed_parameters(path)
    if is_adapter_dir(path):
        files = [path / n for n in (ADAPTER_SAFETENSORS, ADAPTER_BIN) if (path / n).is_file()]
        checkpoint = Checkpoint.from_weight_files(path, files[:1])
    else:
        checkpoint = Checkpoint.open(path)
    with checkpoint:
        return sum(info.numel for info in checkpoint.tensors.values())


def is_listed(ref: str, allowed_models: Sequence[str]) -> bool:
    """Whether an allowlist admits ``ref``: empty admits all; an entry is a reference or a glob
    pattern (``zoo:*``), and a listed hub id admits itself at any revision (``org/name@rev``)."""
    name = ref.partition("@")[0]
    return not allowed_models or any(
        fnmatch.fnmatchcase(ref, allowed) or fnmatch.fnmatchcase(name, allowed)
        for allowed in allowed_models
    )


@dataclass
class ModelPolicy:
    """Which models a job may use: ``allowed_models`` (empty: any local model) and
    ``max_parameters`` (None: no limit). Every model a submission opens goes through ``resolve``,
    which records it in ``used``.

    A reference is allowed when it is listed, when it is a listed hub id at some revision
    (``org/name@rev`` for a listed ``org/name``), or when it resolves to the directory a listed
    reference resolves to (``./models/base`` and its absolute path are one model).
    """

    allowed_models: Sequence[str] = ()
    max_parameters: int | None = None
    used: list[str] = field(default_factory=list)
    _allowed_paths: set[Path] | None = field(default=None, init=False, repr=False)

    def _listed(self, ref: str) -> bool:
        return is_listed(ref, self.allowed_models)

    def _resolves_to_allowed(self, path: Path) -> bool:
        if self._allowed_paths is None:
            self._allowed_paths = set()
            for allowed in self.allowed_models:
                try:
                    self._allowed_paths.add(resolve_model_ref(allowed).resolve())
                except CheckpointError:
                    continue  # an allowed model missing here cannot be what ``path`` is
        return path in self._allowed_paths

    def _refusal(self, ref: str) -> SubmissionError:
        return SubmissionError(
            f"model {ref!r} is not allowed in this competition; the allowed models are: "
            f"{', '.join(self.allowed_models)}"
        )

    def resolve(self, ref: str) -> Path:
        """The local directory of ``ref``, or a ``SubmissionError`` if the job refuses it."""
        listed = self._listed(ref)
        try:
            path = resolve_model_ref(ref).resolve()
        except CheckpointError:
            if not listed:
                raise self._refusal(ref) from None
            raise
        if not listed and not self._resolves_to_allowed(path):
            raise self._refusal(ref)
        if self.max_parameters is not None:
            count = count_parameters(path)
            if count > self.max_parameters:
                raise SubmissionError(
                    f"model {ref!r} has {count:,} parameters, more than this competition's limit "
                    f"of {self.max_parameters:,}; pick a smaller model"
                )
        if ref not in self.used:
            self.used.append(ref)
        return path


@dataclass(frozen=True)
class ModelMounts:
    """What a job's sandbox mounts so that it can read exactly the models its competition
    admits: ``readonly``, each admitted model's directory on its own (never a cache holding
    others), and ``hidden``, directories that hold admitted and other models alike (the zoo's
    committed experts, inside the package), emptied so that only what is bound inside shows."""

    readonly: tuple[Path, ...]
    hidden: tuple[Path, ...]


HUB_FOLDER_PREFIX = "models--"  # the hub cache's folder of org/name is models--org--name


def model_mounts(allowed_models: Sequence[str], hub_cache: Path) -> ModelMounts:
    """The directories of the models ``allowed_models`` admits that exist here.

    - an absolute path, or a glob of them: that path;
    - ``zoo:NAME`` or a pattern (``zoo:*``): each zoo model it matches, built in the cache
      (``<cache>/zoo/<name>``) or committed in the package (``zoo:<task>-lora``);
    - a hub id ``org/name[@revision]`` or a pattern (``org/*``): the model's folder in
      ``hub_cache``, every revision (a snapshot's files link into the folder's blobs);
    - ``BASE+ADAPTER``: both halves.

    An empty allowlist admits any model: the whole zoo and the whole hub cache are mounted; a
    local directory elsewhere is not (list it to admit it). Relative paths are the job's own.
    """
    if not allowed_models:
        return ModelMounts((*_zoo_dirs(lambda ref: True), hub_cache), ())
    entries = [half for entry in allowed_models for half in split_adapter_ref(entry) if half]
    readonly: list[Path] = []
    for entry in entries:
        if Path(entry).is_absolute():
            readonly += [Path(p) for p in sorted(glob.glob(entry))]
    readonly += _zoo_dirs(lambda ref: is_listed(ref, entries))
    for folder in sorted(hub_cache.glob(f"{HUB_FOLDER_PREFIX}*")):
        repo_id = folder.name.removeprefix(HUB_FOLDER_PREFIX).replace("--", "/")
        if any(fnmatch.fnmatchcase(repo_id, entry.partition("@")[0]) for entry in entries):
            readonly.append(folder)
    hidden = (ZOO_EXPERTS_DIR,) if ZOO_EXPERTS_DIR.is_dir() else ()
    return ModelMounts(tuple(dict.fromkeys(readonly)), hidden)


def _zoo_dirs(admits: Callable[[str], bool]) -> list[Path]:
    """What to mount of each zoo model that ``admits`` its reference and that exists.

    A committed expert adapter (``zoo:<task>-lora``) is its directory. A full-weight expert
    (``zoo:<task>``) is its directory in the cache, plus its adapter's ``adapter_config.json``
    alone: the zoo knows its experts by those files (``zoo_expert_names``), and the config
    holds no weights.
    """
    found: list[Path] = []
    for name in [ZOO_BASE_NAME, *zoo_expert_names()]:
        if admits(f"{ZOO_PREFIX}{name}") and zoo_model_dir(name).is_dir():
            found.append(zoo_model_dir(name))
    for task in zoo_expert_names():
        if admits(f"{ZOO_PREFIX}{task}{ZOO_ADAPTER_SUFFIX}"):
            found.append(ZOO_EXPERTS_DIR / task)
        elif admits(f"{ZOO_PREFIX}{task}"):
            found.append(ZOO_EXPERTS_DIR / task / "adapter_config.json")
    return found
