"""Properties every merge method keeps, checked over the registry itself.

A method added later is covered here without anyone remembering to add it: its arguments are
built from its signature (the same spec the recipe validator reads). The inputs are the ones
people actually merge: LoRA experts leave most tensors untouched (task vectors exactly zero),
full fine-tunes differ everywhere, checkpoints come in bfloat16 and sometimes in mixed dtypes.

On CUDA (``MERGEARENA_TEST_DEVICE=cuda`` or a GPU present) the same cases also run on the GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import typical_value

from mergearena.methods import LoraFactors, MethodSpec, all_methods
from mergearena.methods.registry import REQUIRED
from mergearena.methods.task_vectors import _CHUNK

TENSOR_METHODS = [spec for spec in all_methods() if spec.output == "tensor"]
ADAPTER_METHODS = [spec for spec in all_methods() if spec.output == "adapter"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPE = (24, 16)


def arguments(
    spec: MethodSpec, count: int, device: str, *, sparse: bool = False, seed: int = 0
) -> dict[str, Any]:
    """Keyword arguments for ``spec`` with ``count`` models: defaults, and typical values for the
    required parameters (per-model parameters as lists); ``sparse`` sets a density of 0.5."""
    out: dict[str, Any] = {}
    for parameter in spec.parameters:
        if parameter.name == "density" and sparse:
            value: Any = 0.5
        elif parameter.default is REQUIRED:
            value = typical_value(parameter)
        else:
            continue
        out[parameter.argument] = [value] * count if parameter.per_model else value
    if spec.random:
        out["generator"] = torch.Generator(device=device).manual_seed(seed)
    return out


def model_counts(spec: MethodSpec) -> list[int]:
    """One model (where allowed), the minimum, and three (where allowed)."""
    counts = {max(1, spec.min_models), 3}
    if spec.max_models is not None:
        counts = {min(count, spec.max_models) for count in counts}
    return sorted(count for count in counts if count >= spec.min_models)


def call(
    spec: MethodSpec,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    device: str,
    sparse: bool = False,
) -> torch.Tensor:
    kwargs = arguments(spec, len(tensors), device, sparse=sparse)
    if base is not None:
        kwargs["base"] = base
    return spec.function(tensors, **kwargs)


def base_modes(spec: MethodSpec) -> list[bool]:
    """Whether to pass a base: always when required, never when not taken, both when optional."""
    return {"required": [True], "none": [False], "optional": [True, False]}[spec.base]


def cases() -> Iterator[Any]:
    """Every tensor method × base given or not × model counts × devices × dense or sparse (the
    sparse variant only for methods with a density)."""
    for spec in TENSOR_METHODS:
        sparsities = [False, True] if spec.parameter("density") else [False]
        for with_base in base_modes(spec):
            for count in model_counts(spec):
                for device in DEVICES:
                    for sparse in sparsities:
                        label = (
                            f"{spec.name}-{'base' if with_base else 'nobase'}-{count}-{device}"
                            f"{'-sparse' if sparse else ''}"
                        )
                        yield pytest.param(spec, with_base, count, device, sparse, id=label)


def random_tensor(seed: int, dtype: torch.dtype, device: str, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(SHAPE, generator=generator)).to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize(("spec", "with_base", "count", "device", "sparse"), list(cases()))
def test_models_identical_to_the_base_give_the_base_bit_for_bit(
    spec, with_base, count, device, sparse, dtype
):
    """All task vectors zero (what a LoRA expert leaves in every untargeted tensor): the result,
    in the base's dtype, is the base exactly. Without a base, identical models give that model."""
    base = random_tensor(1, dtype, device)
    models = [base.clone() for _ in range(count)]
    result = call(spec, models, base if with_base else None, device, sparse)
    assert result.shape == base.shape
    assert torch.equal(result.to(dtype), base), f"{spec.name} moved identical inputs"


@pytest.mark.parametrize(("spec", "with_base", "count", "device", "sparse"), list(cases()))
def test_all_zero_tensors_stay_zero(spec, with_base, count, device, sparse):
    """A tensor that is zero everywhere in every model (a zero-initialised bias): zero norms."""
    zero = torch.zeros(SHAPE, device=device)
    result = call(
        spec, [zero.clone() for _ in range(count)], zero if with_base else None, device, sparse
    )
    assert torch.equal(result.float(), zero)


@pytest.mark.parametrize(("spec", "with_base", "count", "device", "sparse"), list(cases()))
def test_identical_fine_tunes_are_finite(spec, with_base, count, device, sparse):
    """Every model the same, away from the base: parallel task vectors."""
    base = random_tensor(2, torch.bfloat16, device)
    model = (base.float() + random_tensor(3, torch.float32, device, 0.01)).bfloat16()
    result = call(
        spec, [model.clone() for _ in range(count)], base if with_base else None, device, sparse
    )
    assert torch.isfinite(result).all()
    if not with_base:
        assert torch.equal(result.to(model.dtype), model), f"{spec.name} moved identical inputs"


@pytest.mark.parametrize(("spec", "with_base", "count", "device", "sparse"), list(cases()))
def test_opposite_and_zero_task_vectors_are_finite(spec, with_base, count, device, sparse):
    """Task vectors that cancel (δ and −δ), and one model equal to the base among others."""
    base = random_tensor(4, torch.float32, device)
    delta = random_tensor(5, torch.float32, device, 0.01)
    pool = [base + delta, base - delta, base.clone()]
    models = pool[:count] if count <= 3 else pool * count
    result = call(spec, models, base if with_base else None, device, sparse)
    assert torch.isfinite(result).all()


@pytest.mark.parametrize(("spec", "with_base", "count", "device", "sparse"), list(cases()))
def test_mixed_input_dtypes_are_finite_and_keep_identity(spec, with_base, count, device, sparse):
    """A bf16 base with fp16 and fp32 models (checkpoints saved by different tools)."""
    base = random_tensor(6, torch.bfloat16, device)
    dtypes = [torch.float16, torch.float32, torch.bfloat16]
    same = [base.to(dtypes[index % 3]) for index in range(count)]
    result = call(spec, same, base if with_base else None, device, sparse)
    assert torch.equal(result.to(base.dtype), base), f"{spec.name} moved identical inputs"
    moved = [
        (base.float() + random_tensor(7 + index, torch.float32, device, 0.01)).to(dtypes[index % 3])
        for index in range(count)
    ]
    assert torch.isfinite(call(spec, moved, base if with_base else None, device, sparse)).all()


@pytest.mark.parametrize(("spec", "with_base", "count", "device", "sparse"), list(cases()))
def test_random_full_fine_tunes_are_finite(spec, with_base, count, device, sparse):
    base = random_tensor(20, torch.bfloat16, device)
    models = [
        (base.float() + random_tensor(21 + index, torch.float32, device, 0.02)).bfloat16()
        for index in range(count)
    ]
    result = call(spec, models, base if with_base else None, device, sparse)
    assert result.shape == base.shape
    assert torch.isfinite(result).all()


def test_every_built_in_method_documents_its_degenerate_cases():
    for spec in all_methods():
        if not spec.function.__module__.startswith("mergearena.methods."):
            continue  # a user's method (a test's, here) need not
        assert spec.degenerate, f"{spec.name}: no 'Degenerate cases:' paragraph in its docstring"


# --- adapter-space methods -----------------------------------------------------------------------


def lora(seed: int, rank: int, zero_up: bool = False, device: str = "cpu") -> LoraFactors:
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, SHAPE[1], generator=generator)
    up = (
        torch.zeros(SHAPE[0], rank) if zero_up else torch.randn(SHAPE[0], rank, generator=generator)
    )
    return LoraFactors(down=down.to(device), up=up.to(device), scale=2.0)


def adapter_cases() -> Iterator[Any]:
    for spec in ADAPTER_METHODS:
        for count in model_counts(spec):
            for device in DEVICES:
                yield pytest.param(spec, count, device, id=f"{spec.name}-{count}-{device}")


@pytest.mark.parametrize(("spec", "count", "device"), list(adapter_cases()))
def test_adapters_with_zero_updates_merge_to_a_zero_update(spec, count, device):
    """PEFT initialises B to zero: an adapter that was never trained changes nothing."""
    factors = [lora(index, 2 + index, zero_up=True, device=device) for index in range(count)]
    merged = spec.function(factors, **arguments(spec, count, device))
    delta = merged.delta()
    assert torch.isfinite(merged.up).all() and torch.isfinite(merged.down).all()
    assert torch.equal(delta, torch.zeros_like(delta))


@pytest.mark.parametrize(("spec", "count", "device"), list(adapter_cases()))
def test_random_adapters_merge_to_finite_factors(spec, count, device):
    factors = [lora(index, 2 + index, device=device) for index in range(count)]
    merged = spec.function(factors, **arguments(spec, count, device))
    assert torch.isfinite(merged.up).all() and torch.isfinite(merged.down).all()
    assert merged.delta().shape == SHAPE


@pytest.mark.parametrize("numel", [SHAPE[0] * SHAPE[1], 3 * _CHUNK // 2 + 7])
@pytest.mark.parametrize(("spec", "with_base", "count", "device", "sparse"), list(cases()))
def test_inputs_are_left_unchanged(spec, with_base, count, device, sparse, numel):
    """A search merges the same cached inputs many times (``engine.TensorCache``): no method may
    write into its inputs or its base, on small tensors or on ones merged a block at a time."""
    generator = torch.Generator().manual_seed(30)
    base = torch.randn(numel, generator=generator).to(device)
    models = [
        (base + 0.02 * torch.randn(numel, generator=generator).to(device)).to(dtype)
        for dtype in [torch.float32, torch.bfloat16] * count
    ][:count]
    models[-1] = base.clone()  # a zero task vector among them
    before = [tensor.clone() for tensor in [base, *models]]
    call(spec, models, base if with_base else None, device, sparse)
    for tensor, kept in zip([base, *models], before, strict=True):
        assert torch.equal(tensor, kept), f"{spec.name} wrote into an input"
