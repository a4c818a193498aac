"""Generalized task arithmetic: task vectors, sparsified, sign-elected, summed onto the base.

Every method here is the same pipeline with different steps, as in mergekit's
``GeneralizedTaskArithmeticMerge`` (whose parameter names, defaults and results we match):

1. task vectors ``δᵢ = θᵢ − θ_base`` (float32, ``task_vectors``);
2. sparsify each ``δᵢ`` (``sparsify``: TIES magnitude trim, DARE random drop, breadcrumbs
   outlier + small-value trim, DELLA rank-dependent random drop), optionally rescaled;
3. weight: ``δᵢ ← wᵢ δᵢ``;
4. optionally elect a sign per entry and drop the entries that disagree with it (TIES,
   ``consensus``);
5. sum, optionally divide by the weights that contributed (``normalize``), scale by ``lambda``
   and add to the base.

So the methods are rows of one table, ``VARIANTS``: a row names its sparsification (a
``Sparsification``, which brings its own parameters), whether it elects a sign, its defaults for
``normalize`` and ``rescale``, its paper and its docstring. Each row is registered as a function
whose signature is built from the row (``variant_signature``), which ``@merge_method`` reads as it
reads a ``def``: the recipe validator, ``mergearena methods`` and its JSON derive from it. A new
member of the family is a row, and a new way to sparsify one ``Sparsification`` more.

Streaming (see ``task_vectors``): a sparsification first scans its task vector for what it needs
of the whole tensor and returns a ``Prune`` for one block; then every step runs a block at a time
in buffers that stay in cache, so the deterministic methods give the same bits whatever the block
size.

Memory: the float32 result, DARE's keep decisions (a byte an entry per model) and a few blocks per
model, which a thread keeps from call to call (``Blocks``). DELLA and the ``rescale`` of magnitude
trims, whose L1 norms are whole-tensor sums (kept bit-exact), hold one float32 task vector per
model. The caller's tensors are never modified.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import Tensor

from mergearena.methods.consensus import Consensus, disjoint_merge_, sum_merge_
from mergearena.methods.linear import per_model
from mergearena.methods.registry import REQUIRED, Range, merge_method
from mergearena.methods.sparsify import (
    Prune,
    RescaleMode,
    dare_pruning,
    della_pruning,
    magnitude_outliers_pruning,
    magnitude_pruning,
)
from mergearena.methods.task_vectors import Blocks, TaskVector, as_float32, block_spans

Density = Annotated[list[float], Range(ge=0, le=1)]
Sparsifier = Callable[[TaskVector, int], Prune | None]
"""``(task vector, model index) -> its Prune`` (``None``: keep everything), after any scan."""

TIES_PAPER = "https://arxiv.org/abs/2306.01708"
DARE_PAPER = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS_PAPER = "https://arxiv.org/abs/2312.06795"
DELLA_PAPER = "https://arxiv.org/abs/2406.11617"


# --- the pipeline -------------------------------------------------------------------------------


def generalized_task_arithmetic(
    tensors: list[Tensor],
    base: Tensor,
    weights: list[float],
    sparsify: Sparsifier | None,
    consensus: Consensus | None,
    normalize: bool,
    lambda_: float,
) -> Tensor:
    """``θ_base + λ · merge(wᵢ · sparsify(θᵢ − θ_base))``: the pipeline every method here shares.

    ``sparsify(task_vector, i)`` scans model ``i``'s ``TaskVector`` as it needs and returns the
    ``Prune`` for its blocks (``None`` keeps everything); ``consensus`` ``None`` sums the task
    vectors, otherwise the sign is elected that way and disagreeing entries are dropped
    (``disjoint_merge_``). Then block by block (see the module docstring), the first model's task
    vector computed straight into the result.
    """
    blocks = Blocks.reused(base.numel(), base.device)
    vectors = [TaskVector(tensor, base, blocks) for tensor in tensors]
    prunes = [None if sparsify is None else sparsify(vector, i) for i, vector in enumerate(vectors)]
    merged = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    output, flat_base = merged.view(-1), base.reshape(-1)
    base_buffer, scratch, divisor, *buffers = blocks.floats(len(tensors) + 2)
    for start, stop in block_spans(merged.numel(), merged.device):
        size = stop - start
        base32 = as_float32(flat_base[start:stop], base_buffer[:size])
        deltas = []
        for vector, prune, weight, out in zip(
            vectors, prunes, weights, [output[start:stop]] + buffers, strict=True
        ):
            delta = vector.block(start, stop, out[:size], base32)
            if prune is not None:
                delta = prune(delta, start, scratch[:size])
            if weight != 1:
                delta.mul_(weight)
            deltas.append(delta)
        if consensus is None:
            block = sum_merge_(deltas, weights, normalize)
        else:
            block = disjoint_merge_(
                deltas, weights, normalize, consensus, scratch[:size], divisor[:size]
            )
        if lambda_ != 1:
            block.mul_(lambda_)
        block.add_(base32)
    return merged


# --- the family as data ------------------------------------------------------------------------


def _keyword(name: str, annotation: Any, default: Any = REQUIRED) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


@dataclass(frozen=True)
class Sparsification:
    """One way to sparsify task vectors.

    ``pruning(vector, density=..., rescale=..., **more)`` gives one model's ``Prune`` (``None``
    for no sparsification), where ``more`` holds the model's values of ``parameters`` (per-model,
    declared after ``density``) and, for a ``random`` one, ``rescale_mode`` and ``generator``
    (which then join the signature, making the method random).
    """

    name: str
    pruning: Callable[..., Prune | None] | None
    parameters: tuple[inspect.Parameter, ...] = ()
    random: bool = False


NONE = Sparsification("none", None)
MAGNITUDE = Sparsification("magnitude", magnitude_pruning)  # TIES's trim
RANDOM = Sparsification("random", dare_pruning, random=True)  # DARE's drop
BREADCRUMBS = Sparsification(
    "breadcrumbs",
    magnitude_outliers_pruning,
    (_keyword("gamma", Annotated[list[float], Range(ge=0, le=1)], 0.01),),
)
DELLA = Sparsification(
    "della",
    della_pruning,
    (_keyword("epsilon", Annotated[list[float], Range(ge=0, lt=1)], 0.15),),
    random=True,
)


@dataclass(frozen=True)
class Variant:
    """One method of the family: a row of ``VARIANTS``.

    Every variant needs a base model (task vectors are differences from it) and takes ``weight``,
    ``density``, ``normalize``, ``rescale``, ``lambda`` and ``int8_mask`` (mergekit's parameters:
    ``density`` and ``rescale`` have no effect without sparsification, ``int8_mask`` none at all).
    """

    name: str
    sparsification: Sparsification
    sign_consensus: bool  # TIES's sign election and disjoint merge (a ``consensus`` parameter)
    normalize: bool  # the default of ``normalize``
    rescale: bool  # the default of ``rescale``
    reference: str
    summary: str  # the docstring's first line
    doc: str  # the rest of the docstring: math, paper, "Degenerate cases:" (see ``registry``)


def variant_signature(variant: Variant) -> inspect.Signature:
    """The signature ``@merge_method`` reads for ``variant``, as if written as a ``def``."""
    random = variant.sparsification.random
    parameters = [
        inspect.Parameter(
            "tensors", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=list[Tensor]
        ),
        _keyword("base", Tensor),
        _keyword("weight", list[float]),
        _keyword("density", Density, 1.0),
        *variant.sparsification.parameters,
        *([_keyword("consensus", Consensus, "sum")] if variant.sign_consensus else []),
        _keyword("normalize", bool, variant.normalize),
        _keyword("rescale", bool, variant.rescale),
        *([_keyword("rescale_mode", RescaleMode, "l1")] if random else []),
        _keyword("lambda_", float, 1.0),
        _keyword("int8_mask", bool, False),
        *([_keyword("generator", torch.Generator | None, None)] if random else []),
    ]
    return inspect.Signature(parameters, return_annotation=Tensor)


def merge_variant(variant: Variant, tensors: list[Tensor], arguments: dict[str, Any]) -> Tensor:
    """Merge ``tensors`` as ``variant`` does; ``arguments``: its signature's, defaults applied."""
    count = len(tensors)
    weights = per_model(arguments["weight"], count, "weight")
    pruning, random = variant.sparsification.pruning, variant.sparsification.random
    sparsify: Sparsifier | None = None
    if pruning is not None:
        per_model_names = ["density", *(p.name for p in variant.sparsification.parameters)]
        values = {name: per_model(arguments[name], count, name) for name in per_model_names}
        shared = {"rescale": arguments["rescale"]}
        if random:
            shared |= {
                "rescale_mode": arguments["rescale_mode"],
                "generator": arguments["generator"],
            }

        def sparsify(vector: TaskVector, index: int) -> Prune | None:
            return pruning(
                vector, **{name: value[index] for name, value in values.items()}, **shared
            )

    consensus = arguments["consensus"] if variant.sign_consensus else None
    return generalized_task_arithmetic(
        tensors,
        arguments["base"],
        weights,
        sparsify,
        consensus,
        arguments["normalize"],
        arguments["lambda_"],
    )


def register_variant(variant: Variant) -> Callable[..., Tensor]:
    """Register ``variant`` as a merge method: a function with ``variant_signature`` as its
    ``__signature__`` and annotations, which ``@merge_method`` reads like a ``def``'s. A call
    binds its arguments to that signature (an unknown or missing one is a ``TypeError``, as for
    a ``def``), fills in the defaults and runs ``merge_variant``."""
    signature = variant_signature(variant)

    def method(*args: Any, **kwargs: Any) -> Tensor:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as error:  # name the method, as Python does for a def
            raise TypeError(f"{variant.name}() {error}") from None
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        return merge_variant(variant, arguments.pop("tensors"), arguments)

    method.__name__ = method.__qualname__ = variant.name
    method.__doc__ = f"{variant.summary}\n\n{inspect.cleandoc(variant.doc)}"
    method.__signature__ = signature  # type: ignore[attr-defined]
    method.__annotations__ = {
        name: parameter.annotation for name, parameter in signature.parameters.items()
    } | {"return": Tensor}
    return merge_method(variant.name, reference=variant.reference)(method)


# --- the methods -------------------------------------------------------------------------------

VARIANTS: tuple[Variant, ...] = (
    Variant(
        name="task_arithmetic",
        sparsification=NONE,
        sign_consensus=False,
        normalize=False,
        rescale=False,
        reference="https://arxiv.org/abs/2212.04089",
        summary="Add the weighted task vectors to the base: θ_base + λ Σ wᵢ (θᵢ − θ_base).",
        doc="""
        With ``normalize`` the sum is divided by ``Σ wᵢ``. Ilharco et al., "Editing Models with Task
        Arithmetic", ICLR 2023 (arXiv:2212.04089). ``density``, ``rescale`` and ``int8_mask`` are
        accepted for mergekit compatibility and, as there, have no effect.

        Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a
        LoRA expert does not touch) give the base exactly, whatever the weights; one model gives the
        base plus its weighted task vector. With ``normalize``, weights summing to less than 1e-8 in
        magnitude are not divided by (mergekit's guard).
        """,
    ),
    Variant(
        name="ties",
        sparsification=MAGNITUDE,
        sign_consensus=True,
        normalize=True,
        rescale=False,
        reference=TIES_PAPER,
        summary=(
            "TIES: trim task vectors to their largest entries, elect a sign, merge the "
            "agreeing entries."
        ),
        doc="""
        ``δᵢ ← wᵢ · trim(θᵢ − θ_base)`` keeping the ``max(1, ⌊densityᵢ·n⌋)`` largest ``|δ|``;
        elected sign ``s = sign(Σ δᵢ)`` (``consensus: count``: the majority of signs);
        ``θ = θ_base + λ Σ aᵢδᵢ / Σ aᵢwᵢ`` with ``aᵢ = [sign δᵢ = s]`` (no division without
        ``normalize``). ``rescale`` restores each trimmed vector's L1 norm. ``int8_mask`` is
        accepted for mergekit compatibility (masks are always one byte here).
        Yadav et al., "TIES-Merging", NeurIPS 2023 (arXiv:2306.01708).

        Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a
        LoRA expert does not touch) give the base exactly, whatever the weights and densities; one
        model gives the base plus its trimmed, weighted task vector. An entry where no model agrees
        with the elected sign (or every task vector is zero) stays at the base; a sign tie elects
        +1.
        """,
    ),
    Variant(
        name="dare_linear",
        sparsification=RANDOM,
        sign_consensus=False,
        normalize=False,
        rescale=True,
        reference=DARE_PAPER,
        summary=(
            "DARE: randomly drop task-vector entries, rescale the rest, add the weighted "
            "sum to the base."
        ),
        doc="""
        ``δᵢ ← wᵢ · (mᵢ ⊙ (θᵢ − θ_base)) · cᵢ`` with ``mᵢ ~ Bernoulli(densityᵢ)``;
        ``θ = θ_base + λ Σ δᵢ`` (divided by ``Σ wᵢ`` with ``normalize``).
        ``rescale`` sets ``cᵢ``: with ``rescale_mode: l1`` (mergekit's behaviour, the default)
        ``cᵢ = ‖δᵢ‖₁ / ‖mᵢ ⊙ δᵢ‖₁``; with ``rescale_mode: inverse_density`` the paper's
        ``cᵢ = 1 / densityᵢ``. Without ``rescale``, ``cᵢ = 1``.
        Yu et al., "Language Models are Super Mario", ICML 2024 (arXiv:2311.03099).

        Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a
        LoRA expert does not touch) give the base exactly, whatever the weights and densities; one
        model gives the base plus its randomly dropped, rescaled task vector. A task vector whose L1
        norm is below 1e-7 before or after the drop is not rescaled (no division by zero).
        """,
    ),
    Variant(
        name="dare_ties",
        sparsification=RANDOM,
        sign_consensus=True,
        normalize=False,
        rescale=True,
        reference=DARE_PAPER,
        summary=(
            "DARE-TIES: DARE's random drop and rescale, then TIES' sign election and "
            "disjoint merge."
        ),
        doc="""
        Sparsify as ``dare_linear`` (``rescale_mode: l1`` mergekit's L1-norm ratio, the default, or
        ``inverse_density`` the paper's ``1/density``), then merge as ``ties``:
        ``θ = θ_base + λ Σ aᵢδᵢ`` (divided by ``Σ aᵢwᵢ`` with ``normalize``).
        Yu et al., arXiv:2311.03099; Yadav et al., arXiv:2306.01708.

        Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a
        LoRA expert does not touch) give the base exactly, whatever the weights and densities; one
        model gives the base plus its randomly dropped, rescaled task vector. No rescale divides by
        a norm below 1e-7; where no model agrees with the elected sign the entry stays at the base.
        """,
    ),
    Variant(
        name="breadcrumbs",
        sparsification=BREADCRUMBS,
        sign_consensus=False,
        normalize=False,
        rescale=False,
        reference=BREADCRUMBS_PAPER,
        summary=(
            "Model Breadcrumbs: drop task-vector outliers and small entries, add the weighted sum."
        ),
        doc="""
        Each ``θᵢ − θ_base`` loses its ``⌊γᵢn⌋`` largest entries and then its smallest, keeping
        ``⌊densityᵢ·n⌋`` (see ``magnitude_outliers_prune_``); ``θ = θ_base + λ Σ wᵢδᵢ`` (divided
        by ``Σ wᵢ`` with ``normalize``); ``rescale`` restores each vector's L1 norm. A density of 1
        keeps everything, outliers included (as in mergekit).
        Davari & Belilovsky, "Model Breadcrumbs", ECCV 2024 (arXiv:2312.06795).

        Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a
        LoRA expert does not touch) give the base exactly, whatever the weights and densities; one
        model gives the base plus its trimmed task vector. Equal magnitudes at a cut are broken by
        index, so zero entries never make the kept count exceed ``density·n``.
        """,
    ),
    Variant(
        name="breadcrumbs_ties",
        sparsification=BREADCRUMBS,
        sign_consensus=True,
        normalize=False,
        rescale=False,
        reference=BREADCRUMBS_PAPER,
        summary="Model Breadcrumbs trim followed by TIES' sign election and disjoint merge.",
        doc="""
        Sparsify as ``breadcrumbs``, merge as ``ties``: ``θ = θ_base + λ Σ aᵢδᵢ`` (divided by
        ``Σ aᵢwᵢ`` with ``normalize``). arXiv:2312.06795; arXiv:2306.01708.

        Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a
        LoRA expert does not touch) give the base exactly, whatever the weights and densities; one
        model gives the base plus its trimmed task vector. Where no model agrees with the elected
        sign the entry stays at the base.
        """,
    ),
    Variant(
        name="della",
        sparsification=DELLA,
        sign_consensus=True,
        normalize=True,
        rescale=True,
        reference=DELLA_PAPER,
        summary="DELLA: drop entries at random, large ones less often (MagPrune), then TIES-merge.",
        doc="""
        Entry ``j`` of ``θᵢ − θ_base`` is kept with probability ``densityᵢ − εᵢ + 2εᵢ·rank_j/(m−1)``
        (rank of ``|δ|`` within its row, see ``della_keep_probabilities``); ``rescale`` with
        ``rescale_mode: l1`` (mergekit, the default) restores the L1 norm, ``inverse_density``
        divides each kept entry by its keep probability (the paper). Then merge as ``ties``. Needs
        ``0 < density ± epsilon < 1`` when ``density < 1``.
        Deep et al., "DELLA-Merging", arXiv:2406.11617.

        Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a
        LoRA expert does not touch) give the base exactly, whatever the weights and densities; one
        model gives the base plus its randomly dropped task vector. A row of one entry keeps with
        probability ``density − ε``; ``density ± ε`` outside (0, 1) is an error that names both
        values.
        """,
    ),
    Variant(
        name="della_linear",
        sparsification=DELLA,
        sign_consensus=False,
        normalize=False,
        rescale=True,
        reference=DELLA_PAPER,
        summary="DELLA's MagPrune drop followed by a plain weighted sum of the task vectors.",
        doc="""
        Sparsify as ``della``; ``θ = θ_base + λ Σ wᵢδᵢ`` (divided by ``Σ wᵢ`` with ``normalize``).
        Deep et al., "DELLA-Merging", arXiv:2406.11617.

        Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a
        LoRA expert does not touch) give the base exactly, whatever the weights and densities; one
        model gives the base plus its randomly dropped task vector. ``density ± ε`` outside (0, 1)
        is an error that names both values.
        """,
    ),
)

_METHODS = {variant.name: register_variant(variant) for variant in VARIANTS}
task_arithmetic = _METHODS["task_arithmetic"]
ties = _METHODS["ties"]
dare_linear = _METHODS["dare_linear"]
dare_ties = _METHODS["dare_ties"]
breadcrumbs = _METHODS["breadcrumbs"]
breadcrumbs_ties = _METHODS["breadcrumbs_ties"]
della = _METHODS["della"]
della_linear = _METHODS["della_linear"]
