"""Model references: a local directory, ``zoo:NAME``, or a hub id ``org/name[@revision]``.

Resolving only looks: it never builds, converts or writes anything (the arena resolves inside a
sandbox whose caches are read-only). Hub ids resolve from the local Hugging Face cache only,
unless a caller explicitly allows a download; nothing here touches the network by default.

The embedded zoo's layout is known here, so resolving ``zoo:NAME`` needs no zoo code (which
builds on the engine, which resolves references):

- ``<cache>/zoo/<name>/``: a built model, ``zoo:smollm2-135m`` or a full-weight expert
  ``zoo:<task>``, complete once its ``zoo.json`` manifest (written last) matches its files;
  ``mergearena zoo prepare`` builds them;
- ``mergearena/zoo/experts/<task>/``: a committed LoRA expert, ``zoo:<task>-lora``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mergearena.errors import CheckpointError

ZOO_PREFIX = "zoo:"
ZOO_BASE_NAME = "smollm2-135m"
ZOO_ADAPTER_SUFFIX = "-lora"
ZOO_EXPERTS_DIR = Path(__file__).resolve().parents[1] / "zoo" / "experts"
ZOO_MANIFEST = "zoo.json"
ZOO_MANIFEST_VERSION = 1
_HUB_ID = re.compile(r"^(?P<repo>[\w][\w.-]*/[\w][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")


def mergearena_cache_dir() -> Path:
    """Where mergearena keeps prepared models: ``$MERGEARENA_CACHE`` or ``~/.cache/mergearena``."""
    return Path(os.environ.get("MERGEARENA_CACHE") or "~/.cache/mergearena").expanduser()


def zoo_model_dir(name: str) -> Path:
    """The directory a prepared zoo model ``name`` lives in (it may not exist yet)."""
    return mergearena_cache_dir() / "zoo" / name


def zoo_expert_names() -> list[str]:
    """Tasks with a committed expert adapter, sorted."""
    if not ZOO_EXPERTS_DIR.is_dir():
        return []
    return sorted(
        p.name for p in ZOO_EXPERTS_DIR.iterdir() if (p / "adapter_config.json").is_file()
    )


def zoo_adapter_dir(task: str) -> Path:
    """``zoo:<task>-lora``: the committed adapter of expert ``task``."""
    directory = ZOO_EXPERTS_DIR / task
    if not (directory / "adapter_config.json").is_file():
        known = ", ".join(zoo_expert_names()) or "none"
        raise CheckpointError(f"the zoo has no expert for {task!r} (experts: {known}).")
    return directory


def zoo_model_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a complete built zoo model, or None when it is.

    Reads the ``zoo.json`` manifest and compares file sizes (no hashing: fast enough for every
    lookup; ``mergearena zoo prepare --verify`` checks the SHA-256 too).
    """
    if not directory.is_dir():
        return "not prepared"
    try:
        document = json.loads((directory / ZOO_MANIFEST).read_text())
        files = document["files"]
        sizes = {name: int(expected["bytes"]) for name, expected in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"no readable {ZOO_MANIFEST}"
    if document.get("version") != ZOO_MANIFEST_VERSION:
        return f"{ZOO_MANIFEST} is from another mergearena version"
    for name, expected in sizes.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected:
            return f"{name} has {path.stat().st_size} bytes, expected {expected}"
    return None


def _resolve_zoo(ref: str) -> Path:
    name = ref.removeprefix(ZOO_PREFIX)
    if not name or "/" in name or name in (".", ".."):
        raise CheckpointError(f"{ref!r}: not a valid zoo reference; write zoo:NAME.")
    experts = zoo_expert_names()
    if name.endswith(ZOO_ADAPTER_SUFFIX) and name.removesuffix(ZOO_ADAPTER_SUFFIX) in experts:
        return zoo_adapter_dir(name.removesuffix(ZOO_ADAPTER_SUFFIX))
    if name != ZOO_BASE_NAME and name not in experts:
        names = [ZOO_BASE_NAME] + [n for e in experts for n in (e, e + ZOO_ADAPTER_SUFFIX)]
        raise CheckpointError(f"zoo:{name} is not in the zoo; it has: {', '.join(names)}.")
    directory = zoo_model_dir(name)
    problem = zoo_model_problem(directory)
    if problem is None:
        return directory
    if name == ZOO_BASE_NAME:
        raise CheckpointError(
            f"zoo:{name} is not ready ({problem} in {directory}); run `mergearena zoo prepare`."
        )
    raise CheckpointError(
        f"zoo:{name}, the {name} expert with full weights, is not built ({problem} in "
        f"{directory}); build it with `mergearena zoo prepare`, or use its adapter, "
        f"zoo:{name}{ZOO_ADAPTER_SUFFIX}."
    )


def _resolve_hub(ref: str, repo_id: str, revision: str | None, allow_download: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # Read HF_HUB_CACHE now rather than when huggingface_hub was imported.
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    at_revision = f" at revision {revision!r}" if revision else ""
    try:
        try:
            # The local cache first, even when downloads are allowed: no network if cached.
            snapshot = snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True
            )
        except LocalEntryNotFoundError:
            if not allow_download:
                raise
            snapshot = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir)
    except LocalEntryNotFoundError as error:
        where = cache_dir or "the local Hugging Face cache"
        action = (
            f"download it first (`hf download {repo_id}`) or pass a local directory"
            if not allow_download
            else "check the network, HF_HUB_OFFLINE and the repository name"
        )
        raise CheckpointError(
            f"{ref!r}: not a local directory, and hub model {repo_id!r}{at_revision} is not in "
            f"{where}; {action}."
        ) from error
    except Exception as error:  # repository not found, gated, bad revision, network...
        raise CheckpointError(
            f"{ref!r}: cannot get hub model {repo_id!r}{at_revision} ({error})."
        ) from error
    return Path(snapshot)


def resolve_model_ref(ref: str, *, allow_download: bool = False) -> Path:
    """The local directory of a model reference.

    Tried in order: an existing local directory; ``zoo:NAME`` (the zoo in the mergearena cache,
    as prepared: nothing is built here); a hub id ``org/name`` or ``org/name@revision`` in the
    local Hugging Face cache (with ``allow_download``, fetched from the hub if missing).
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if ref.startswith(ZOO_PREFIX):
        return _resolve_zoo(ref)
    if path.exists():
        raise CheckpointError(f"{ref!r}: is a file; a model reference must be a directory.")
    match = _HUB_ID.match(ref)
    if match and not ref.startswith((".", "/", "~")):
        return _resolve_hub(ref, match["repo"], match["revision"], allow_download)
    raise CheckpointError(
        f"{ref!r}: not a model reference. Tried a local directory (none at {path.absolute()}), "
        "zoo:NAME (no zoo: prefix) and a hub id org/name[@revision] (not of that form)."
    )


def split_adapter_ref(ref: str) -> tuple[str, str | None]:
    """mergekit's ``MODEL+ADAPTER`` form as ``(model, adapter)``; ``(ref, None)`` for a plain
    reference, including a local path whose name contains ``+``."""
    model, plus, adapter = ref.partition("+")
    if not (plus and model and adapter) or Path(ref).expanduser().exists():
        return ref, None
    return model, adapter


def model_ref_exists(ref: str) -> bool:
    """True if ``ref`` resolves to a local directory without downloading anything."""
    try:
        resolve_model_ref(ref)
    except CheckpointError:
        return False
    return True
