"""Model references: a local directory, ``zoo:NAME``, or a hub id ``org/name[@revision]``.

Hub ids resolve from the local Hugging Face cache only, unless a caller explicitly allows a
download; nothing here touches the network by default.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mergearena.errors import CheckpointError

ZOO_PREFIX = "zoo:"
_HUB_ID = re.compile(r"^(?P<repo>[\w][\w.-]*/[\w][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")


def mergearena_cache_dir() -> Path:
    """Where mergearena keeps prepared models: ``$MERGEARENA_CACHE`` or ``~/.cache/mergearena``."""
    return Path(os.environ.get("MERGEARENA_CACHE") or "~/.cache/mergearena").expanduser()


def zoo_model_dir(name: str) -> Path:
    """The directory a prepared zoo model ``name`` lives in (it may not exist yet)."""
    return mergearena_cache_dir() / "zoo" / name


def _resolve_zoo(ref: str) -> Path:
    name = ref.removeprefix(ZOO_PREFIX)
    if not name or "/" in name or name in (".", ".."):
        raise CheckpointError(f"{ref!r}: not a valid zoo reference; write zoo:NAME.")
    from mergearena.zoo.catalog import resolve  # the zoo builds on checkpoints, not vice versa

    return resolve(name)


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

    Tried in order: an existing local directory; ``zoo:NAME`` (the prepared zoo in the mergearena
    cache); a hub id ``org/name`` or ``org/name@revision`` in the local Hugging Face cache (with
    ``allow_download``, fetched from the hub if missing).
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


def model_ref_exists(ref: str) -> bool:
    """True if ``ref`` resolves to a local directory without downloading anything."""
    try:
        resolve_model_ref(ref)
    except CheckpointError:
        return False
    return True
