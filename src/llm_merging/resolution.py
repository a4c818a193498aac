"""How the starter kit's model names resolve: through the job's model policy in the arena, to
any local model outside it. ``Merges`` resolves every model it loads here, and
``submission.installed`` sets ``policy`` for the length of a job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from mergearena.checkpoints import resolve_model_ref
from mergearena.errors import SubmissionError


class ModelResolver(Protocol):
    """What resolves the kit's model names: the arena's job passes its ``ModelPolicy``
    (allowlist, parameter limit); this package does not import the arena, which imports it."""

    def resolve(self, ref: str) -> Path: ...


class AnyLocalModel:
    """Outside a job (a participant trying a method locally): any local model reference."""

    def resolve(self, ref: str) -> Path:
        return resolve_model_ref(ref).resolve()


# The job's model policy, set for the duration of a job (``submission.installed``).
policy: ModelResolver = AnyLocalModel()


def resolve(name: str | None, revision: str | None = None) -> Path:
    """The local directory of model ``name`` if the job allows it (the arena's ``ModelPolicy``).

    A hub id with a revision resolves that revision from the local cache (``name@revision``).
    """
    if not name:
        raise SubmissionError("a model name is empty: set base_model_name and list_models")
    reference = str(name)
    if revision and not reference.startswith("zoo:") and not Path(reference).expanduser().exists():
        reference = f"{reference}@{revision}"
    return policy.resolve(reference)
