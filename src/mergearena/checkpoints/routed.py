"""The routed model's directory: a ``routed.json`` manifest, the experts' adapters, the router.

Layout of a routed model ``DIR``::

    DIR/routed.json              the manifest (``Manifest`` below)
    DIR/experts/<name>/          each expert, a PEFT LoRA adapter (adapter_config.json + weights)
    DIR/general/<name>/          arrow with GenKnowSub only: the general adapters
    DIR/centroids.safetensors    prompt router only: "centroids", one unit row per expert

The base model is not copied: ``base`` is a model reference (``zoo:NAME``, a directory, a hub id).
``mergearena.routed.build`` writes this format; ``mergearena.models.routed`` loads it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from mergearena.checkpoints.lora import ADAPTER_BIN, ADAPTER_SAFETENSORS
from mergearena.checkpoints.reader import Checkpoint
from mergearena.checkpoints.refs import resolve_model_ref
from mergearena.errors import CheckpointError

MANIFEST = "routed.json"
FORMAT: Final = "mergearena-routed-lora"
CENTROIDS = "centroids.safetensors"
ROUTERS = {"arrow": "per token, PEFT's Arrow", "prompt": "per prompt, nearest centroid"}


def _inside(path: str) -> str:
    """A path relative to the routed model's directory that stays in it: the directory is then
    everything the model is, beside its base (what an arena submission ships)."""
    pure = PurePosixPath(path)
    if not pure.parts or pure.is_absolute() or ".." in pure.parts or "\\" in path or ":" in path:
        raise ValueError(f"{path!r} must be a path inside the routed model's directory")
    return path


InsidePath = Annotated[str, AfterValidator(_inside)]


class Expert(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")  # a PEFT adapter name: no dots
    adapter: InsidePath  # the adapter's directory, relative to the routed model's
    source: str  # the reference it was built from
    rank: int = Field(ge=1)
    # A full fine-tune compressed to ``rank``: the share of its delta's squared Frobenius norm kept.
    # None for a LoRA adapter kept as it is.
    captured: float | None = None


class ArrowRouter(BaseModel):
    """Per token, in every LoRA layer: the ``top_k`` experts whose prototypes (each expert's top
    right singular vector) are most similar to the token, mixed by a softmax at ``temperature``
    (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs")."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["arrow"]
    top_k: int = Field(default=3, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    general: list[InsidePath] = []  # GenKnowSub: adapters whose mean every expert loses
    rng_seed: int | None = 0  # the prototypes' power iteration starts from a seeded vector


class PromptRouter(BaseModel):
    """Per prompt: the expert whose centroid (the mean embedding of its calibration prompts) is
    nearest the prompt's embedding by cosine similarity; the whole example uses it."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["prompt"]
    calibration_rows: int = Field(ge=1)
    calibration: dict[str, str]  # expert name → the task file its calibration rows came from
    centroids: InsidePath = CENTROIDS


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["mergearena-routed-lora"] = FORMAT
    version: Literal[1] = 1
    base: str
    experts: list[Expert] = Field(min_length=1)
    router: Annotated[ArrowRouter | PromptRouter, Field(discriminator="kind")]

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        names = [expert.name for expert in self.experts]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"expert names repeat: {', '.join(repeated)}")
        router = self.router
        if isinstance(router, ArrowRouter) and router.top_k > len(names):
            raise ValueError(
                f"router.top_k is {router.top_k} but there are {len(names)} experts; "
                f"choose a top_k from 1 to {len(names)}"
            )
        if isinstance(router, PromptRouter) and set(router.calibration) != set(names):
            raise ValueError("router.calibration must name each expert's calibration file once")
        return self

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST
        path.write_text(json.dumps(self.model_dump(), indent=2) + "\n", encoding="utf-8")
        return path


def is_routed_dir(path: str | Path) -> bool:
    """True if ``path`` is a routed model's directory (it holds ``routed.json``)."""
    return (Path(path).expanduser() / MANIFEST).is_file()


def find_routed_dir(directory: Path) -> Path | None:
    """The routed model in an unpacked archive: ``directory`` itself or one folder down."""
    for candidate in [directory, *sorted(p for p in directory.iterdir() if p.is_dir())]:
        if is_routed_dir(candidate):
            return candidate
    return None


def read_manifest(directory: str | Path) -> Manifest:
    """The validated manifest of a routed model, or a ``CheckpointError`` naming the bad key."""
    path = Path(directory).expanduser() / MANIFEST
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{path}: cannot read the routed model's manifest ({error})"
        ) from None
    try:
        return Manifest.model_validate(document)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            # A tagged union adds the tag to the location ("router.prompt.calibration").
            location = ".".join(str(p) for p in item["loc"] if p not in ROUTERS)
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "union_tag_invalid":
                message = f"unknown router {item['input'].get('kind')!r}; use one of " + ", ".join(
                    f"{kind} ({what})" for kind, what in ROUTERS.items()
                )
            problems.append(f"{location or '(top)'}: {message}")
        raise CheckpointError(
            f"{path}: not a valid routed model: {'; '.join(problems)}. Rebuild it with "
            "`mergearena route`."
        ) from None


def expert_name(ref: str) -> str:
    """The adapter name an expert gets from its reference: ``zoo:spam-lora`` and ``zoo:spam`` are
    ``spam``; a directory is its folder's name; what PEFT cannot name becomes ``_``."""
    name = ref.removeprefix("zoo:").removesuffix("-lora") if ref.startswith("zoo:") else ref
    name = Path(name.rstrip("/")).name or "expert"
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def count_parameters(directory: str | Path) -> int:
    """Every parameter a routed model runs with, from weight-file headers: the base's, each
    expert adapter's (and Arrow's general adapters'), and the prompt router's centroids."""
    directory = Path(directory).expanduser()
    manifest = read_manifest(directory)
    router = manifest.router
    adapters = [directory / e.adapter for e in manifest.experts]
    if isinstance(router, ArrowRouter):
        adapters += [directory / path for path in router.general]
    files = [
        next((a / n for n in (ADAPTER_SAFETENSORS, ADAPTER_BIN) if (a / n).is_file()), a)
        for a in adapters
    ]
    if isinstance(router, PromptRouter):
        files.append(directory / router.centroids)
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
        raise CheckpointError(f"{directory}: routed model files are missing: {', '.join(missing)}")
    with Checkpoint.open(resolve_model_ref(manifest.base)) as base:
        total = sum(info.numel for info in base.tensors.values())
    for file in files:  # one at a time: the experts' files share tensor names
        with Checkpoint.from_weight_files(directory, [file]) as part:
            total += sum(info.numel for info in part.tensors.values())
    return total
