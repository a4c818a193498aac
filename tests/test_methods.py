"""Merge methods: hand-checked values, properties, and plain transcriptions of mergekit's formulas.

Every expected number in a ``# ...`` comment is worked out by hand from the method's docstring.
The ``reference_*`` helpers at the top transcribe mergekit 0.1.5's algorithms in the most direct
way (argsort-based pruning, stacked masks) so the fast implementations can be compared to them.
"""

from __future__ import annotations

import math
from typing import Annotated

import pytest
import torch

from mergearena.methods import (
    LoraFactors,
    all_methods,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    geometric_median,
    get_method,
    karcher,
    linear,
    lora_concat,
    lora_svd,
    model_stock,
    multislerp,
    nearswap,
    passthrough,
    selection,
    slerp,
    task_arithmetic,
    task_vectors,
    ties,
)
from mergearena.methods.consensus import elected_sign
from mergearena.methods.linear import per_model
from mergearena.methods.registry import REQUIRED, Range, merge_method
from mergearena.methods.selection import keep_largest_, keep_rank_range_, largest_mask
from mergearena.methods.sparsify import (
    della_keep_probabilities,
    magnitude_outliers_prune_,
    magnitude_prune_,
)

t = torch.tensor


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_models(
    count: int, shape: tuple[int, ...] = (16, 12), seed: int = 0, scale: float = 0.1
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``count`` models near it (distinct magnitudes with probability 1)."""
    generator = seeded(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + scale * torch.randn(shape, generator=generator) for _ in range(count)]


# --- plain transcriptions of mergekit 0.1.5 ----------------------------------------------------


def reference_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit ``sparsify.magnitude``: argsort |δ| descending, keep the first k."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel())
    mask[torch.argsort(delta.abs().reshape(-1), descending=True, stable=True)[:k]] = 1
    return delta * mask.view_as(delta)


def reference_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit ``sparsify.magnitude_outliers``: sort |δ| ascending, keep a slice of the order."""
    if density >= 1:
        return delta
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n)
    mask[order[bottom : bottom + target]] = 1
    return delta * mask.view_as(delta)


def reference_gta(tensors, base, weights, prune, consensus, normalize, lambda_=1.0) -> torch.Tensor:
    """mergekit ``GeneralizedTaskArithmeticMerge.merge_group`` with stacked tensors and masks."""
    deltas = torch.stack([prune(tensor - base, i) for i, tensor in enumerate(tensors)])
    w = torch.tensor(weights).view(-1, *([1] * base.dim()))
    deltas = deltas * w
    if consensus is not None:
        sign = deltas.sign()
        votes = deltas.sum(0) if consensus == "sum" else sign.sum(0)
        mask = sign == ((votes >= 0).float() * 2 - 1)
        mixed = (deltas * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(0)
        divisor = w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lambda_ * mixed


# --- the registry ------------------------------------------------------------------------------

ALL = {
    "linear", "passthrough", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "slerp", "multislerp", "karcher", "nearswap",
    "model_stock", "geometric_median", "lora_concat", "lora_svd",
}  # fmt: skip


def test_registry_lists_every_method_with_a_one_line_summary():
    specs = {spec.name: spec for spec in all_methods()}
    assert ALL <= set(specs)
    for name in ALL:
        summary = specs[name].summary
        assert summary and "\n" not in summary and summary.endswith("."), name
        assert specs[name].reference.startswith("https://"), name


def test_ties_spec_needs_base_and_weights_and_bounds_density():
    spec = get_method("ties")
    assert spec.base == "required" and not spec.random and spec.min_models == 1
    weight, density = spec.parameter("weight"), spec.parameter("density")
    assert weight.per_model and weight.required and weight.kind is float
    assert density.per_model and density.default == 1.0
    assert density.check(0.5) is None and density.check(1.5) is not None
    assert spec.parameter("lambda").argument == "lambda_"
    assert spec.parameter("lambda").default == 1.0 and not spec.parameter("lambda").per_model
    assert spec.parameter("consensus").choices == ("sum", "count")
    assert spec.parameter("int8_mask").default is False


@pytest.mark.parametrize(
    ("name", "normalize", "rescale", "random", "consensus"),
    [  # mergekit 0.1.5 registry defaults
        ("task_arithmetic", False, False, False, False),
        ("ties", True, False, False, True),
        ("dare_ties", False, True, True, True),
        ("dare_linear", False, True, True, False),
        ("breadcrumbs", False, False, False, False),
        ("breadcrumbs_ties", False, False, False, True),
        ("della", True, True, True, True),
        ("della_linear", False, True, True, False),
    ],
)
def test_task_arithmetic_family_defaults_match_mergekit(
    name, normalize, rescale, random, consensus
):
    spec = get_method(name)
    assert spec.base == "required" and spec.random is random
    assert spec.parameter("normalize").default is normalize
    assert spec.parameter("rescale").default is rescale
    assert (spec.parameter("consensus") is not None) is consensus
    assert spec.parameter("weight").required and spec.parameter("density").default == 1.0
    if name.startswith("breadcrumbs"):
        assert spec.parameter("gamma").per_model and spec.parameter("gamma").default == 0.01
    if name.startswith("della"):
        assert spec.parameter("epsilon").per_model and spec.parameter("epsilon").default == 0.15
    if random:
        assert spec.parameter("rescale_mode").choices == ("l1", "inverse_density")


def test_a_new_row_of_the_task_arithmetic_table_is_a_method_with_its_contract(monkeypatch):
    """The family is a table: a row it does not have (TIES' trim with rescale, then a plain sum)
    registers as a method whose parameters, validation, docs and results all derive from the row,
    as a ``def``'s derive from its signature."""
    from mergearena.methods import registry
    from mergearena.methods.task_arithmetic import MAGNITUDE, Variant, register_variant

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    row = Variant(
        name="magnitude_linear",
        sparsification=MAGNITUDE,
        sign_consensus=False,
        normalize=False,
        rescale=True,
        reference="https://arxiv.org/abs/2306.01708",
        summary="TIES' trim, then a plain weighted sum.",
        doc="Degenerate cases: those of ``ties`` without its sign election.",
    )
    method = register_variant(row)
    spec = get_method("magnitude_linear")
    assert spec.function is method and spec.base == "required" and not spec.random
    assert [p.name for p in spec.parameters] == [
        "weight", "density", "normalize", "rescale", "lambda", "int8_mask"
    ]  # fmt: skip
    assert spec.parameter("rescale").default is True and spec.parameter("density").per_model
    assert spec.parameter("density").check(1.5) is not None
    assert spec.summary == row.summary
    assert spec.degenerate == "those of ``ties`` without its sign election."

    def trimmed_and_rescaled(delta, index):
        pruned = reference_magnitude(delta, densities[index])
        return pruned * (delta.abs().sum() / pruned.abs().sum())

    base, models = random_models(3, seed=21)
    densities, weights = [0.3, 0.6, 0.9], [0.5, 1.0, 1.5]
    expected = reference_gta(models, base, weights, trimmed_and_rescaled, None, normalize=False)
    merged = method(models, base=base, weight=weights, density=densities)
    assert torch.allclose(merged, expected, atol=1e-6)
    with pytest.raises(TypeError, match="gamma"):  # breadcrumbs' parameter, not this row's
        method(models, base=base, weight=weights, gamma=0.1)


def test_other_specs():
    slerp_spec = get_method("slerp")
    assert (slerp_spec.base, slerp_spec.min_models, slerp_spec.max_models) == ("required", 1, 1)
    assert slerp_spec.parameter("t").required and slerp_spec.parameter("t").check(1.2) is not None
    assert get_method("nearswap").parameter("t").check(0) is not None  # t > 0
    assert get_method("multislerp").base == "optional"
    assert get_method("karcher").base == "none" and get_method("linear").base == "none"
    assert get_method("model_stock").min_models == 2
    assert get_method("passthrough").max_models == 1
    assert get_method("geometric_median").parameter("weight").default == 1.0
    for name in ("lora_concat", "lora_svd"):
        assert get_method(name).output == "adapter"
    assert get_method("lora_svd").parameter("rank").default is REQUIRED


def test_a_per_model_parameter_with_a_scalar_default_is_annotated_list_or_item(monkeypatch):
    """``list[X] | X`` (what a per-model default of one number for every model really is, so a
    type checker accepts ``= 1.0``) registers as ``list[X]`` does; a union of other members is
    not a per-model parameter and is refused."""
    from mergearena.methods import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @merge_method("scaled_sum_for_test", reference="-")
    def scaled_sum(
        tensors: list[torch.Tensor], *, weight: Annotated[list[float] | float, Range(ge=0)] = 1.0
    ) -> torch.Tensor:
        """Degenerate cases: none."""
        return sum(tensors)

    weight = get_method("scaled_sum_for_test").parameter("weight")
    assert (weight.per_model, weight.kind, weight.default) == (True, float, 1.0)
    assert weight.check(-1.0) is not None
    with pytest.raises(TypeError, match="unsupported parameter annotation"):

        @merge_method("mixed_for_test", reference="-")
        def mixed(tensors: list[torch.Tensor], *, weight: list[float] | int = 1) -> torch.Tensor:
            """Degenerate cases: none."""
            return tensors[0]


def test_per_model_broadcasts_a_scalar_and_checks_length():
    assert per_model(0.5, 3, "density") == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="density has 2 values but there are 3 models"):
        per_model([0.5, 0.5], 3, "density")


# --- linear and passthrough --------------------------------------------------------------------


def test_linear_by_hand():
    a, b = t([1.0, 2.0]), t([3.0, 6.0])
    # (1·a + 3·b) / 4 = [10, 20] / 4
    assert torch.equal(linear([a, b], weight=[1.0, 3.0]), t([2.5, 5.0]))
    assert torch.equal(linear([a, b], weight=[1.0, 3.0], normalize=False), t([10.0, 20.0]))
    assert torch.equal(linear([a], weight=[0.3]), a)  # one model in, same model out
    x = torch.randn(50, generator=seeded(0))
    assert torch.equal(linear([x], weight=[3.0]), x)  # exactly, not 3x / 3
    with pytest.raises(ValueError, match="sum to zero"):
        linear([a, b], weight=[1.0, -1.0])


def test_linear_works_large_tensors_in_blocks_with_the_same_bits():
    from mergearena.methods.linear import _BLOCK

    rows = (_BLOCK // 1000) * 2 + 3  # more than two blocks, the last one short
    generator = seeded(1)
    models = [torch.randn(rows, 1000, generator=generator).to(torch.bfloat16) for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    expected = models[0].float().clone()
    for model, weight in zip(models[1:], weights[1:], strict=True):
        expected.add_(model.float() - models[0].float(), alpha=weight)
    result = linear(models, weight=weights)
    assert result.dtype == torch.float32 and result.shape == (rows, 1000)
    assert torch.equal(result, expected)
    assert torch.equal(linear([models[0], models[0]], weight=[0.4, 0.6]), models[0].float())


def test_passthrough_returns_the_model_optionally_scaled():
    a = t([1.0, -2.0])
    assert passthrough([a]) is a
    assert torch.equal(passthrough([a], scale=[0.5]), t([0.5, -1.0]))


# --- task arithmetic, TIES -----------------------------------------------------------------------


def test_task_arithmetic_by_hand():
    base = t([1.0, 1.0, 1.0])
    models = [t([2.0, 0.0, 1.0]), t([1.0, 3.0, 1.0])]  # δ = [1, -1, 0], [0, 2, 0]
    # 1·[1, -1, 0] + 0.5·[0, 2, 0] = [1, 0, 0]
    assert torch.equal(task_arithmetic(models, base=base, weight=[1.0, 0.5]), t([2.0, 1.0, 1.0]))
    # λ = 2 doubles the sum; normalize divides it by 1.5
    assert torch.equal(
        task_arithmetic(models, base=base, weight=[1.0, 0.5], lambda_=2.0), t([3.0, 1.0, 1.0])
    )
    normalized = task_arithmetic(models, base=base, weight=[1.0, 0.5], normalize=True)
    assert torch.allclose(normalized, t([1 + 1 / 1.5, 1.0, 1.0]))
    assert torch.equal(task_arithmetic([models[0]], base=base, weight=[1.0]), models[0])


TIES_DELTAS = [t([3.0, -1.0, 2.0, -4.0]), t([-2.0, 5.0, 1.0, -1.0]), t([1.0, 1.0, -3.0, 2.0])]


def test_ties_by_hand():
    base = torch.zeros(4)
    # trim: density .5 keeps 2 of 4: [3, 0, 0, -4] and [-2, 5, 0, 0]; density .75 keeps 3 of
    # [1, 1, -3, 2]: -3, 2 and, of the tied 1s, the lower index -> [1, 0, -3, 2].
    density = [0.5, 0.5, 0.75]
    # elect: Σ = [2, 5, -3, -2] -> signs [+, +, -, -]; agreeing entries per column:
    # col 0: 3 and 1 (w sum 2) -> 2; col 1: 5 -> 5; col 2: -3 -> -3; col 3: -4 (2 disagrees) -> -4
    merged = ties(TIES_DELTAS, base=base, weight=[1.0, 1.0, 1.0], density=density)
    assert torch.equal(merged, t([2.0, 5.0, -3.0, -4.0]))
    unnormalized = ties(TIES_DELTAS, base=base, weight=[1.0] * 3, density=density, normalize=False)
    assert torch.equal(unnormalized, t([4.0, 5.0, -3.0, -4.0]))
    # weights [1, 2, 1]: col 0 sums to 3 - 4 + 1 = 0, a tie that elects +: (3 + 1) / (1 + 1) = 2
    weighted = ties(TIES_DELTAS, base=base, weight=[1.0, 2.0, 1.0], density=density)
    assert torch.equal(weighted, t([2.0, 5.0, -3.0, -4.0]))
    # consensus count, col 3: signs -, 0, + -> tie -> +: only model 3's 2 is kept
    counted = ties(TIES_DELTAS, base=base, weight=[1.0] * 3, density=density, consensus="count")
    assert torch.equal(counted, t([2.0, 5.0, -3.0, 2.0]))


def test_elected_sign_by_hand():
    deltas = [t([3.0, -1.0, 0.0]), t([-1.0, -1.0, 0.0]), t([-1.0, 5.0, 0.0])]
    # sums [1, 3, 0] -> +, +, + (0 elects +); counts [-1, -1, 0] -> -, -, +
    assert torch.equal(elected_sign(deltas, "sum"), t([1.0, 1.0, 1.0]))
    assert torch.equal(elected_sign(deltas, "count"), t([-1.0, -1.0, 1.0]))


def test_ties_with_density_one_and_agreeing_signs_is_task_arithmetic():
    base, _ = random_models(0)
    step = torch.rand((16, 12), generator=seeded(1)) + 0.1
    models = [base + step, base + 2 * step, base + 0.5 * step]  # all task vectors positive
    weights = [0.3, 0.5, 1.2]
    expected = task_arithmetic(models, base=base, weight=weights)
    assert torch.allclose(ties(models, base=base, weight=weights, normalize=False), expected)


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[0.7, 1.3, 0.5], [1.0, -0.4, 0.8]])
def test_ties_matches_mergekit_transcription(consensus, normalize, weights):
    base, models = random_models(3, seed=2)
    densities = [0.3, 0.55, 0.8]
    expected = reference_gta(
        models,
        base,
        weights,
        lambda d, i: reference_magnitude(d, densities[i]),
        consensus,
        normalize,
        lambda_=0.8,
    )
    merged = ties(
        models,
        base=base,
        weight=weights,
        density=densities,
        consensus=consensus,
        normalize=normalize,
        lambda_=0.8,
    )
    assert torch.allclose(merged, expected, atol=1e-6)


def test_ties_rescale_restores_each_trimmed_l1_norm():
    base, models = random_models(1, seed=3)
    merged = ties(models, base=base, weight=[1.0], density=0.2, rescale=True)
    delta = models[0] - base
    kept = reference_magnitude(delta, 0.2)
    assert torch.allclose(merged - base, kept * (delta.abs().sum() / kept.abs().sum()), atol=1e-6)


# --- exact top-k and rank ranges ---------------------------------------------------------------


def test_keep_largest_keeps_exactly_k_and_breaks_ties_by_index():
    values = t([1.0, -3.0, 2.0, 3.0, 3.0, 0.5])
    # |3| three times: k = 2 keeps indices 1 and 3 (lower index first), drops 4
    assert torch.equal(keep_largest_(values.clone(), 2), t([0.0, -3.0, 0.0, 3.0, 0.0, 0.0]))
    assert torch.equal(keep_largest_(values.clone(), 4), t([0.0, -3.0, 2.0, 3.0, 3.0, 0.0]))
    assert torch.equal(keep_largest_(values.clone(), 6), values)
    assert torch.equal(keep_largest_(values.clone(), 0), torch.zeros(6))


def tied_values(seed: int) -> torch.Tensor:
    """20k nonzero values of 400 magnitudes and both signs: dozens of exact ties at any cut,
    spread over many radix buckets."""
    generator = seeded(seed)
    magnitudes = torch.randint(1, 401, (20_000,), generator=generator) / 16
    return magnitudes * (torch.randint(0, 2, (20_000,), generator=generator) * 2 - 1)


@pytest.fixture(params=["collected whole", "sampled brackets", "missed brackets"])
def small_blocks(request, monkeypatch):
    """Scan in blocks of 4096 entries, so that small tensors exercise the multi-block paths; and
    find magnitude ranks among all entries, in brackets from a sample (as for large tensors), or
    in brackets so narrow that most miss and radix selection takes over."""
    monkeypatch.setattr(task_vectors, "_CHUNK", 4096)
    if request.param != "collected whole":
        monkeypatch.setattr(selection, "_MIN_SAMPLE", 16)
        monkeypatch.setattr(selection, "_SAMPLE_EVERY", 4)
    if request.param == "missed brackets":
        monkeypatch.setattr(selection, "_SIGMAS", 0.0)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("kind", ["tied", "distinct", "mostly zero"])
def test_magnitude_ranks_equal_a_sort(kind):
    generator = seeded(6)
    values = {
        "tied": tied_values(seed=6),
        "distinct": torch.randn(20_000, generator=generator),
        "mostly zero": torch.randn(20_000, generator=generator) * (torch.arange(20_000) % 5 == 0),
    }[kind]
    magnitudes = values.abs()
    ordered = magnitudes.sort().values
    ranks = [0, 1, 137, 5_000, 10_000, 16_001, 19_998, 19_999]
    found_ranks = selection.magnitude_ranks(selection._Magnitudes(values), ranks)
    for rank, found in zip(ranks, found_ranks, strict=True):
        value = ordered[rank]
        assert (found.value, found.below, found.equal) == (
            float(value),
            int((magnitudes < value).sum()),
            int((magnitudes == value).sum()),
        )


def one_heavy_magnitude(seed: int) -> torch.Tensor:
    """20k values, 60% of them ±1.5 at scattered places: a cut inside that mass has only ties
    around it (a sample brackets it between 1.5 and 1.5)."""
    generator = seeded(seed)
    values = torch.randn(20_000, generator=generator)
    heavy = torch.rand(20_000, generator=generator) < 0.6
    return torch.where(heavy, 1.5 * values.sign(), values)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("count", [1, 777, 10_000, 19_999])
@pytest.mark.parametrize("make_values", [tied_values, one_heavy_magnitude])
def test_keep_largest_equals_a_stable_sort_with_many_ties(count, make_values):
    values = make_values(seed=4)
    reference = torch.zeros(20_000, dtype=torch.bool)
    reference[torch.argsort(values.abs(), descending=True, stable=True)[:count]] = True
    kept = keep_largest_(values.clone(), count)
    assert torch.equal(kept, torch.where(reference, values, 0.0))
    assert int((kept != 0).sum()) == count
    assert torch.equal(largest_mask(values.abs(), count), reference)  # the GPU's sync-free cut


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize(
    ("start", "stop"), [(0, 10), (3, 8), (5, 5), (8_000, 19_990), (9_000, 9_010)]
)
def test_keep_rank_range_equals_a_stable_ascending_sort(start, stop):
    values = tied_values(seed=5)
    order = torch.sort(values.abs(), stable=True).indices
    reference = torch.zeros(20_000, dtype=torch.bool)
    reference[order[start:stop]] = True
    assert torch.equal(keep_rank_range_(values.clone(), start, stop), values * reference)


@pytest.mark.parametrize("method", [ties, breadcrumbs_ties, task_arithmetic])
def test_deterministic_merges_do_not_depend_on_the_block_size(method, monkeypatch):
    """Blocks go through the whole tensor's float32 operations: the same bits, block by block."""
    base, models = random_models(3, shape=(150, 101), seed=15, scale=0.01)
    low = [model.bfloat16() for model in models]
    arguments = {"base": base.bfloat16(), "weight": [0.7, 1.0, 0.4]}
    if method is not task_arithmetic:
        arguments["density"] = [0.3, 0.5, 0.8]
    whole = method(low, **arguments)
    monkeypatch.setattr(task_vectors, "_CHUNK", 4096)
    assert torch.equal(method(low, **arguments).view(torch.int32), whole.view(torch.int32))


def test_dare_keep_decisions_do_not_depend_on_the_block_size():
    from mergearena.methods.sparsify import KeepStream

    whole = KeepStream(0.3, seeded(5)).next_(torch.empty(10_000, dtype=torch.uint8))
    stream, parts = KeepStream(0.3, seeded(5)), torch.empty(10_000, dtype=torch.uint8)
    for start in range(0, 10_000, 4096):
        stream.next_(parts[start : start + 4096])
    assert torch.equal(whole, parts)
    assert abs(whole.float().mean().item() - 0.3) < 0.02


def test_dare_keep_probability_is_resolved_below_the_16_bit_words():
    """A density between two multiples of 2⁻¹⁶ keeps at its own rate, not at either neighbour's
    (the ties of the 16-bit words are settled by a second stream)."""
    from mergearena.methods.sparsify import KeepStream

    density, count = 1.5 / 2**16, 1 << 24  # 384 expected; 256 or 512 if rounded to 2⁻¹⁶
    kept = KeepStream(density, seeded(7)).next_(torch.empty(count, dtype=torch.uint8))
    assert abs(int(kept.sum()) - density * count) < 5 * math.sqrt(density * count)


def test_magnitude_prune_matches_mergekit_on_distinct_magnitudes():
    delta = torch.randn(37, 29, generator=seeded(6))
    for density in (0.0, 0.01, 0.3, 0.999, 1.0):
        expected = reference_magnitude(delta, density) if density > 0 else torch.zeros_like(delta)
        assert torch.equal(magnitude_prune_(delta.clone(), density), expected)


# --- breadcrumbs ---------------------------------------------------------------------------------


def test_breadcrumbs_by_hand():
    delta = t([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    # n = 10, keep ⌊.5·10⌋ = 5, drop ⌊.2·10⌋ = 2 outliers -> ascending ranks [3, 8): |4|..|8|
    expected = t([0.0, 0.0, 0.0, -4.0, 5.0, -6.0, 7.0, -8.0, 0.0, 0.0])
    assert torch.equal(magnitude_outliers_prune_(delta.clone(), 0.5, 0.2), expected)
    merged = breadcrumbs([delta], base=torch.zeros(10), weight=[1.0], density=0.5, gamma=0.2)
    assert torch.equal(merged, expected)
    # density + gamma > 1: fewer outliers go (b = max(0, 10 - 9 - 2) = 0), keep the 9 smallest
    assert torch.equal(magnitude_outliers_prune_(delta.clone(), 0.9, 0.2)[-1], t(0.0))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_match_mergekit_transcription(method):
    base, models = random_models(3, seed=7)
    densities, gammas, weights = [0.3, 0.6, 0.9], [0.05, 0.1, 0.2], [0.5, 1.0, 1.5]
    expected = reference_gta(
        models,
        base,
        weights,
        lambda d, i: reference_outliers(d, densities[i], gammas[i]),
        "sum" if method == "breadcrumbs_ties" else None,
        normalize=True,
    )
    merge = breadcrumbs_ties if method == "breadcrumbs_ties" else breadcrumbs
    merged = merge(
        models, base=base, weight=weights, density=densities, gamma=gammas, normalize=True
    )
    assert torch.allclose(merged, expected, atol=1e-6)


# --- DARE and DELLA ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [dare_linear, dare_ties, della, della_linear])
def test_random_methods_are_identity_at_density_one_and_reproducible(method):
    base, models = random_models(3, seed=8)
    weights = [0.5, 1.0, 0.7]
    full = method(models, base=base, weight=weights, generator=seeded(0))
    consensus = "sum" if method in (dare_ties, della) else None
    normalize = get_method(method.spec.name).parameter("normalize").default
    expected = reference_gta(models, base, weights, lambda d, i: d, consensus, normalize)
    assert torch.allclose(full, expected, atol=1e-6)
    first = method(models, base=base, weight=weights, density=0.5, generator=seeded(1))
    again = method(models, base=base, weight=weights, density=0.5, generator=seeded(1))
    other = method(models, base=base, weight=weights, density=0.5, generator=seeded(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_dare_drops_at_the_density_rate_and_rescales():
    base = torch.zeros(20_000)
    model = torch.randn(20_000, generator=seeded(9))
    plain = dare_linear([model], base=base, weight=[1.0], density=0.3, generator=seeded(3))
    kept = plain != 0
    assert 0.28 < kept.float().mean() < 0.32
    # rescale_mode l1 (mergekit): the kept entries are scaled so that ‖result‖₁ = ‖δ‖₁
    assert torch.allclose(plain.abs().sum(), model.abs().sum())
    assert torch.allclose(plain[kept] / model[kept], plain[kept][0] / model[kept][0])
    # inverse_density (the paper): the same mask (same seed), kept entries divided by 0.3
    paper = dare_linear(
        [model],
        base=base,
        weight=[1.0],
        density=0.3,
        rescale_mode="inverse_density",
        generator=seeded(3),
    )
    assert torch.allclose(paper, torch.where(kept, model / 0.3, 0.0))
    raw = dare_linear(
        [model], base=base, weight=[1.0], density=0.3, rescale=False, generator=seeded(3)
    )
    assert torch.equal(raw, torch.where(kept, model, 0.0))


def test_della_keep_probabilities_by_hand():
    # ranks of |[0.1, -0.5, 0.3]| are [0, 2, 1]: p = 0.5 - 0.1 + 0.2 · rank / 2
    probabilities = della_keep_probabilities(t([[0.1, -0.5, 0.3]]), density=0.5, epsilon=0.1)
    assert torch.allclose(probabilities, t([[0.4, 0.6, 0.5]]))
    # a 1-D tensor is one row; ranks are per row (dimension 1) for matrices
    assert torch.allclose(della_keep_probabilities(t([2.0, 1.0]), 0.5, 0.1), t([0.6, 0.4]))
    rows = della_keep_probabilities(t([[1.0, 2.0], [4.0, 3.0]]), 0.5, 0.1)
    assert torch.allclose(rows, t([[0.4, 0.6], [0.6, 0.4]]))


@pytest.mark.usefixtures("small_blocks")
def test_della_keep_probabilities_rank_along_dimension_one():
    delta = torch.randn(3, 500, 7, generator=seeded(15))
    rows = delta.abs().movedim(1, -1)
    ranks = torch.argsort(torch.argsort(rows, dim=-1, stable=True), dim=-1).float()
    expected = (0.4 + 0.2 * ranks / 499).movedim(-1, 1)
    assert torch.allclose(della_keep_probabilities(delta, 0.5, 0.1), expected)


def test_della_rejects_density_and_epsilon_outside_the_unit_interval():
    base, models = random_models(1)
    with pytest.raises(ValueError, match="density ± epsilon"):
        della(models, base=base, weight=[1.0], density=0.9, epsilon=0.15, generator=seeded(0))


def test_della_inverse_density_divides_by_each_keep_probability():
    base = torch.zeros(1, 4)
    model = t([[1.0, -2.0, 3.0, -4.0]])  # p = [0.4, 0.4667, 0.5333, 0.6]
    merged = della_linear(
        [model],
        base=base,
        weight=[1.0],
        density=0.5,
        epsilon=0.1,
        rescale_mode="inverse_density",
        generator=seeded(4),
    )
    probabilities = della_keep_probabilities(model, 0.5, 0.1)
    kept = merged != 0
    assert torch.allclose(merged[kept], (model / probabilities)[kept])


# --- spherical -----------------------------------------------------------------------------------


def test_slerp_endpoints_and_a_quarter_turn():
    a, b = t([2.0, 0.0]), t([0.0, 1.0])
    assert torch.equal(slerp([b], base=a, t=0.0), a)
    assert torch.equal(slerp([b], base=a, t=1.0), b)
    # θ = π/2: coefficients sin(π/4)/sin(π/2) = √½ on the raw (unnormalised) vectors
    assert torch.allclose(slerp([b], base=a, t=0.5), t([2 * math.sqrt(0.5), math.sqrt(0.5)]))


def test_slerp_falls_back_to_lerp_for_near_parallel_tensors():
    a = t([1.0, 2.0, 3.0])
    b = 1.5 * a + t([0.001, 0.0, 0.0])  # cos θ ≈ 0.99999 > 0.9995
    assert torch.allclose(slerp([b], base=a, t=0.3), 0.7 * a + 0.3 * b, atol=1e-7)
    # antiparallel also interpolates linearly rather than dividing by sin θ ≈ 0
    assert torch.allclose(slerp([-a], base=a, t=0.5), torch.zeros(3), atol=1e-7)


def test_nearswap_by_hand():
    base, other = torch.zeros(3), t([0.05, 1.0, -0.2])
    # w = clamp(0.1 / |a - b|) = [1, 0.1, 0.5]; w·b + (1 - w)·a
    assert torch.allclose(nearswap([other], base=base, t=0.1), t([0.05, 0.1, -0.1]))


def test_multislerp_by_hand():
    a, b = t([1.0, 0.0]), t([0.0, 1.0])
    assert multislerp([a], weight=[1.0]) is a
    # equal weights: direction (a + b)/|a + b|, length the mean norm 1
    half = math.sqrt(0.5)
    assert torch.allclose(multislerp([a, b], weight=[1.0, 1.0]), t([half, half]))
    offset = t([5.0, 5.0])
    with_base = multislerp([a + offset, 3 * b + offset], weight=[1.0, 1.0], base=offset)
    assert torch.allclose(with_base, offset + 2 * t([half, half]))  # mean norm (1 + 3) / 2
    # directions that cancel have no mean direction: the linear average, for any number of models
    assert torch.allclose(multislerp([a, -a], weight=[1.0, 1.0]), torch.zeros(2))
    assert torch.allclose(multislerp([a, -a, a - a], weight=[1.0, 1.0, 1.0]), torch.zeros(2))
    # with a base, models equal to it (zero task vectors) give the base, not a refusal
    assert torch.equal(multislerp([offset, offset, offset], weight=[1.0] * 3, base=offset), offset)


def test_karcher_by_hand():
    a, b = t([1.0, 0.0]), t([0.0, 3.0])
    assert karcher([a]) is a
    # the geodesic midpoint of the unit directions, at the mean norm (1 + 3) / 2 = 2
    half = math.sqrt(0.5)
    assert torch.allclose(karcher([a, b]), t([2 * half, 2 * half]), atol=1e-5)
    assert torch.allclose(karcher([b, b, b]), b)
    # weights 2:1 put the mean at a third of the arc: angle π/6 from a
    weighted = karcher([a, b], weight=[2.0, 1.0], max_iter=50, tol=1e-7)
    norm = (2 * 1 + 3) / 3
    expected = norm * t([math.cos(math.pi / 6), math.sin(math.pi / 6)])
    assert torch.allclose(weighted, expected, atol=1e-5)


# --- model stock ---------------------------------------------------------------------------------


def test_model_stock_by_hand():
    base = torch.zeros(2)
    # offsets [1, 1] and [1, 0]: cos θ = 1/√2, t = 2c / (1 + c), average [1, 0.5]
    c = 1 / math.sqrt(2)
    ratio = 2 * c / (1 + c)
    merged = model_stock([t([1.0, 1.0]), t([1.0, 0.0])], base=base)
    assert torch.allclose(merged, t([ratio, 0.5 * ratio]))
    # orthogonal offsets: cos θ = 0, t = 0, the base is kept
    assert torch.equal(model_stock([t([1.0, 0.0]), t([0.0, 1.0])], base=base), base)


def test_model_stock_filter_wise_uses_one_ratio_per_row():
    base = torch.zeros(2, 2)
    first, second = t([[1.0, 1.0], [1.0, 0.0]]), t([[1.0, 0.0], [0.0, 1.0]])
    c = 1 / math.sqrt(2)
    ratio = 2 * c / (1 + c)
    merged = model_stock([first, second], base=base, filter_wise=True)
    # row 0 as above; row 1 has orthogonal offsets and keeps the base
    assert torch.allclose(merged, t([[ratio, 0.5 * ratio], [0.0, 0.0]]))
    whole = model_stock([first, second], base=base)  # one ratio for the whole tensor
    cos = (first * second).sum() / (first.norm() * second.norm())
    assert torch.allclose(whole, (2 * cos / (1 + cos)) * (first + second) / 2)


# --- geometric median ----------------------------------------------------------------------------


def naive_weiszfeld(deltas, weights, iterations=2000):
    points = torch.stack([d.double().reshape(-1) for d in deltas])
    w = torch.tensor(weights, dtype=torch.float64)
    z = (w[:, None] * points).sum(0) / w.sum()
    for _ in range(iterations):
        inverse = w / (points - z).norm(dim=1).clamp(min=1e-12)
        z = (inverse[:, None] * points).sum(0) / inverse.sum()
    return z.float().view(deltas[0].shape)


def test_geometric_median_of_identical_task_vectors_is_that_vector():
    base, (model,) = random_models(1, seed=10)
    assert torch.allclose(geometric_median([model, model, model], base=base), model)
    assert torch.allclose(geometric_median([model], base=base), model)
    assert torch.allclose(geometric_median([model], base=base, lambda_=0.5), (base + model) / 2)


def test_geometric_median_is_robust_to_one_outlier():
    base = torch.zeros(8)
    target = torch.ones(8)
    noise = torch.randn(4, 8, generator=seeded(11)) * 0.05
    models = [target + n for n in noise] + [target + 100.0]
    median = geometric_median(models, base=base)
    mean = torch.stack(models).mean(0)
    assert (median - target).norm() < 0.2 < (mean - target).norm()


def test_geometric_median_matches_plain_weiszfeld():
    base, models = random_models(5, shape=(6, 5), seed=12, scale=1.0)
    weights = [1.0, 2.0, 0.5, 1.0, 1.5]
    expected = base + naive_weiszfeld([m - base for m in models], weights)
    merged = geometric_median(models, base=base, weight=weights, max_iter=1000, tol=0.0)
    assert torch.allclose(merged, expected, atol=1e-5)
    # 1-D points 0, 1, 3, 10 and 11 with equal weights: the median is the middle point, 3
    points = [t([v]) for v in (0.0, 1.0, 3.0, 10.0, 11.0)]
    assert torch.allclose(geometric_median(points, base=t([0.0])), t([3.0]), atol=1e-3)


# --- LoRA ----------------------------------------------------------------------------------------


def lora(rank: int, seed: int, scale: float) -> LoraFactors:
    generator = seeded(seed)
    return LoraFactors(
        down=torch.randn(rank, 10, generator=generator),
        up=torch.randn(12, rank, generator=generator),
        scale=scale,
    )


def test_lora_concat_is_the_exact_weighted_sum_for_different_ranks():
    factors = [lora(4, 0, 0.5), lora(8, 1, 2.0)]
    merged = lora_concat(factors, weight=[0.7, 1.5])
    assert merged.rank == 12 and merged.scale == 1.0
    expected = 0.7 * factors[0].delta() + 1.5 * factors[1].delta()
    assert torch.allclose(merged.delta(), expected, atol=1e-5)
    # by hand: ranks 1 and 1, up [1; 0] and [0; 2], down [1, 1] and [3, 0], scales 1 and 0.5
    one = LoraFactors(down=t([[1.0, 1.0]]), up=t([[1.0], [0.0]]), scale=1.0)
    two = LoraFactors(down=t([[3.0, 0.0]]), up=t([[0.0], [2.0]]), scale=0.5)
    # delta = 1·[[1, 1], [0, 0]] + 0.5·[[0, 0], [6, 0]] = [[1, 1], [3, 0]]
    assert torch.equal(lora_concat([one, two]).delta(), t([[1.0, 1.0], [3.0, 0.0]]))


def test_lora_svd_is_exact_at_full_rank_and_optimal_below():
    factors = [lora(4, 2, 0.5), lora(8, 3, 2.0)]
    exact = 0.7 * factors[0].delta() + 1.5 * factors[1].delta()
    full = lora_svd(factors, weight=[0.7, 1.5], rank=12)
    assert full.rank == 12 and full.scale == 1.0
    assert torch.allclose(full.delta(), exact, atol=1e-4)
    assert lora_svd(factors, weight=[0.7, 1.5], rank=64).rank == 12
    u, s, vh = torch.linalg.svd(exact)
    best = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]
    truncated = lora_svd(factors, weight=[0.7, 1.5], rank=5)
    assert truncated.rank == 5
    assert torch.allclose(truncated.delta(), best, atol=1e-4)
    # the singular values are split evenly: up and down have equal column / row norms
    assert torch.allclose(truncated.up.norm(dim=0), truncated.down.norm(dim=1), rtol=1e-4)


# --- inputs -----------------------------------------------------------------------------------


def _every_full_weight_method(models, base):
    yield ties(models, base=base, weight=[1.0] * 3, density=0.5)
    yield ties(models, base=base, weight=[1.0] * 3, density=0.5, rescale=True)
    yield task_arithmetic(models, base=base, weight=[1.0] * 3)
    yield breadcrumbs_ties(models, base=base, weight=[1.0] * 3, density=0.5, rescale=True)
    yield dare_ties(models, base=base, weight=[1.0] * 3, density=0.5, generator=seeded(0))
    yield della(models, base=base, weight=[1.0] * 3, density=0.5, generator=seeded(0))
    yield linear(models, weight=[1.0] * 3)
    yield slerp(models[:1], base=base, t=0.3)
    yield nearswap(models[:1], base=base, t=0.01)
    yield multislerp(models, weight=[1.0] * 3, base=base)
    yield karcher(models)
    yield model_stock(models, base=base)
    yield geometric_median(models, base=base)


def test_methods_never_modify_their_inputs():
    base, models = random_models(3, seed=13)
    copies = [m.clone() for m in (base, *models)]
    for result in _every_full_weight_method(models, base):
        assert result.shape == base.shape and result.dtype == torch.float32
    for original, copy in zip((base, *models), copies, strict=True):
        assert torch.equal(original, copy)


def test_bfloat16_inputs_are_merged_in_float32():
    base, models = random_models(3, seed=14)
    low = [m.bfloat16() for m in models]
    low_base = base.bfloat16()
    upcast = [m.float() for m in low]
    for low_result, result in zip(
        _every_full_weight_method(low, low_base),
        _every_full_weight_method(upcast, low_base.float()),
        strict=True,
    ):
        assert low_result.dtype == torch.float32
        assert torch.allclose(low_result, result, atol=1e-5)


def test_dare_keep_rate_matches_density_including_extremes():
    from mergearena.methods.sparsify import bernoulli_mask

    delta = torch.ones(400_000)
    generator = torch.Generator().manual_seed(0)
    for density in (0.1, 0.5, 0.9):
        kept = bernoulli_mask(delta, density, generator).float().mean().item()
        assert abs(kept - density) < 0.005
    assert bernoulli_mask(delta, 1.0 - 1e-7, generator).all()
    assert not bernoulli_mask(delta, 1e-7, generator).any()
