"""Errors that are part of mergearena's interface.

Every message says what was wrong, where (file, recipe key, tensor name) and what to do.
"""


def shorten(text: str, limit: int = 200) -> str:
    """``text``, or its start and its length when longer than ``limit``: a message that names a
    5,000-character path (or value) stays readable."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


class MergeArenaError(Exception):
    """Base class: the CLI prints these without a traceback."""


class RecipeError(MergeArenaError):
    """The recipe is invalid (unknown method or parameter, bad value, missing base model...)."""


class CheckpointError(MergeArenaError):
    """A checkpoint or adapter cannot be read: missing, corrupt, truncated, unsupported format."""


class MergeError(MergeArenaError):
    """A merge method produced an unusable result (NaN or Inf) from valid inputs."""


class ShapeMismatchError(CheckpointError):
    """Inputs disagree on a tensor's presence or shape."""


class TaskError(MergeArenaError):
    """A task file (or its sidecar) is malformed: the message names the file, row id and problem."""


class EvaluationError(MergeArenaError):
    """A model cannot be evaluated as asked (an undefined scoring rule, a missing tokenizer...)."""


class ArenaError(MergeArenaError):
    """The competition service refuses a request: the message says why and what to do."""


class SubmissionError(ArenaError):
    """A submission is unacceptable: a bad archive or recipe, a model not allowed, over a limit."""


class AuthError(ArenaError):
    """A missing or wrong API token."""


class NotFoundError(ArenaError):
    """No such competition, phase or submission."""


class LimitError(SubmissionError):
    """A team is over its daily submission limit; the message says when the next slot opens."""


class SearchError(MergeArenaError):
    """A search cannot start or go on as asked (its storage, its Ray cluster, its tasks)."""
