"""End to end: recipes over tiny real checkpoints, merged, written, loaded back by transformers."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import typical_value
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergearena import merge
from mergearena.cli import app
from mergearena.engine import iter_output_tensors
from mergearena.errors import CheckpointError, MergeError, RecipeError, ShapeMismatchError


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    return dict(iter_output_tensors(directory))


def forward_is_finite(directory: Path) -> bool:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        logits = model(torch.arange(8).unsqueeze(0)).logits
    return bool(torch.isfinite(logits).all())


@pytest.fixture
def trio(make_checkpoint):
    """A tiny Llama base and two fine-tunes of it."""
    base = make_checkpoint("llama", seed=0)
    return base, make_checkpoint("llama", 1, base=base), make_checkpoint("llama", 2, base=base)


def recipe_for(method: str, base: Path, a: Path, b: Path, c: Path | None = None) -> dict:
    """A valid recipe for ``method`` over base and two (or three) fine-tunes."""
    experts = [a, b] + ([c] if c else [])
    weighted = [{"model": str(p), "parameters": {"weight": 0.5}} for p in experts]
    sparse = [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.6}} for p in experts]
    recipes = {
        "linear": {"models": weighted},
        "passthrough": {"models": [{"model": str(a)}]},
        "task_arithmetic": {"models": weighted, "base_model": str(base)},
        "ties": {"models": sparse, "base_model": str(base)},
        "dare_linear": {"models": sparse, "base_model": str(base)},
        "dare_ties": {"models": sparse, "base_model": str(base)},
        "breadcrumbs": {"models": sparse, "base_model": str(base)},
        "breadcrumbs_ties": {"models": sparse, "base_model": str(base)},
        "della": {"models": sparse, "base_model": str(base)},
        "della_linear": {"models": sparse, "base_model": str(base)},
        "slerp": {
            "models": [{"model": str(base)}, {"model": str(a)}],
            "base_model": str(base),
            "parameters": {"t": 0.3},
        },
        "nearswap": {
            "models": [{"model": str(a)}],
            "base_model": str(base),
            "parameters": {"t": 0.001},
        },
        "multislerp": {"models": weighted, "base_model": str(base)},
        "karcher": {"models": [{"model": str(p)} for p in experts]},
        "model_stock": {"models": [{"model": str(p)} for p in experts], "base_model": str(base)},
        "geometric_median": {
            "models": [{"model": str(p)} for p in experts],
            "base_model": str(base),
        },
    }
    return {"merge_method": method, "seed": 1, **recipes[method]}


TENSOR_METHODS = [
    "linear",
    "passthrough",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "nearswap",
    "multislerp",
    "karcher",
    "model_stock",
    "geometric_median",
]


def test_every_full_weight_method_is_covered_here():
    from mergearena.methods import all_methods

    full_weight = {spec.name for spec in all_methods() if spec.output == "tensor"}
    assert full_weight == set(TENSOR_METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", TENSOR_METHODS)
def test_every_method_writes_a_checkpoint_transformers_loads_and_runs(
    make_checkpoint, tmp_path, kind, method
):
    base = make_checkpoint(kind, seed=0)
    a, b = make_checkpoint(kind, 1, base=base), make_checkpoint(kind, 2, base=base)
    c = make_checkpoint(kind, 3, base=base) if method == "model_stock" else None
    out = tmp_path / "out"
    result = merge(recipe_for(method, base, a, b, c), out)
    assert result.tensors == len(load_state(base))
    assert forward_is_finite(out)


def test_ties_merge_output_layout(trio, tmp_path):
    base, a, b = trio
    out = tmp_path / "merged"
    merge(recipe_for("ties", base, a, b), out, max_shard_bytes=20_000)
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors.index.json",
        "README.md",
        "mergearena_recipe.yaml",
        "tokenizer.json",
    } <= names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "merge_method: ties" in (out / "README.md").read_text()
    assert forward_is_finite(out)
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_one_model_in_is_the_same_model_out(trio, tmp_path):
    _, a, _ = trio
    merge(
        {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 3}}]},
        tmp_path / "out",
    )
    expected = load_state(a)
    for name, tensor in load_state(tmp_path / "out").items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


def test_task_arithmetic_equals_base_plus_weighted_deltas(trio, tmp_path):
    base, a, b = trio
    recipe = recipe_for("task_arithmetic", base, a, b)
    recipe["parameters"] = {"lambda": 0.8}
    merge(recipe, tmp_path / "out")
    sb, sa, s2 = load_state(base), load_state(a), load_state(b)
    for name, tensor in load_state(tmp_path / "out").items():
        expected = sb[name] + 0.8 * (0.5 * (sa[name] - sb[name]) + 0.5 * (s2[name] - sb[name]))
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6)


def test_gradient_and_filter_parameters_resolve_per_tensor(trio, tmp_path):
    base, a, _ = trio
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {
                "model": str(a),
                "parameters": {"weight": [{"filter": "mlp", "value": 0.0}, {"value": [0.0, 1.0]}]},
            }
        ],
    }
    merge(recipe, tmp_path / "out")
    out, sb, sa = load_state(tmp_path / "out"), load_state(base), load_state(a)
    first, last = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(out[first], sb[first])  # gradient start: weight 0
    torch.testing.assert_close(out[last], sa[last])  # gradient end: weight 1
    torch.testing.assert_close(
        out["model.layers.1.mlp.up_proj.weight"], sb["model.layers.1.mlp.up_proj.weight"]
    )  # filter: weight 0


def test_random_methods_are_deterministic_for_a_seed(trio, tmp_path):
    base, a, b = trio
    recipe = recipe_for("dare_ties", base, a, b)
    merge(recipe, tmp_path / "one")
    merge(recipe, tmp_path / "two")
    merge({**recipe, "seed": 2}, tmp_path / "three")
    one, two, three = (load_state(tmp_path / n) for n in ("one", "two", "three"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(one[name], two[name])
    assert not torch.equal(one[name], three[name])


def test_out_dtype_and_config_dtype(trio, tmp_path):
    base, a, b = trio
    merge(
        {**recipe_for("linear", base, a, b), "dtype": "float32", "out_dtype": "bfloat16"},
        tmp_path / "out",
    )
    assert all(t.dtype == torch.bfloat16 for t in load_state(tmp_path / "out").values())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"


def test_lora_experts_are_inputs_to_full_weight_methods(make_checkpoint, make_lora, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_checkpoint("llama", seed=0)
    adapter = make_lora(base, seed=3, r=4)
    merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}],
        },
        tmp_path / "a",
    )
    merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}],
        },
        tmp_path / "b",
    )
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    expected = reference.merge_and_unload().state_dict()
    for directory in (tmp_path / "a", tmp_path / "b"):
        for name, tensor in load_state(directory).items():
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lora_concat", "lora_svd"])
def test_adapter_space_merge_equals_the_exact_sum_of_deltas(
    make_checkpoint, make_lora, tmp_path, method
):
    from mergearena.checkpoints import LoraAdapter

    base = make_checkpoint("llama", seed=0)
    first = make_lora(base, seed=1, r=4, targets=("q_proj", "v_proj"))
    second = make_lora(base, seed=2, r=8, targets=("q_proj", "o_proj"))
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(first), "parameters": {"weight": 0.7}},
            {"model": str(second), "parameters": {"weight": 0.3}},
        ],
    }
    if method == "lora_svd":
        recipe["parameters"] = {"rank": 12}  # total rank: exact
    out = tmp_path / "adapter"
    merge(recipe, out)
    merged = LoraAdapter.open(out)
    shapes = {name: tuple(t.shape) for name, t in load_state(base).items()}
    adapters = [LoraAdapter.open(first), LoraAdapter.open(second)]
    assert merged.target_weight_names() == set().union(*(a.target_weight_names() for a in adapters))
    for name in merged.target_weight_names():
        expected = sum(
            weight * delta
            for weight, adapter in zip((0.7, 0.3), adapters, strict=True)
            if (delta := adapter.delta(name, shapes[name])) is not None
        )
        torch.testing.assert_close(merged.delta(name, shapes[name]), expected, rtol=1e-4, atol=1e-5)


def test_adapter_merge_refuses_full_models(trio, tmp_path):
    base, a, b = trio
    with pytest.raises(RecipeError, match="is not a LoRA adapter"):
        merge(
            {"merge_method": "lora_concat", "models": [{"model": str(a)}, {"model": str(b)}]},
            tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


# --- bad inputs: a clear error, and nothing written -------------------------------------------


def assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "mergearena-tmp" in p.name]


def test_missing_model_reference(trio, tmp_path):
    base, a, _ = trio
    with pytest.raises(CheckpointError, match="no-such-model"):
        merge(recipe_for("ties", base, a, tmp_path / "no-such-model"), tmp_path / "out")
    assert_nothing_written(tmp_path)


def test_shape_mismatch_names_tensor_and_both_shapes(make_checkpoint, tmp_path):
    llama = make_checkpoint("llama", seed=0)
    other = make_checkpoint("llama", seed=1, vocab_size=64)
    with pytest.raises(ShapeMismatchError) as error:
        merge(recipe_for("linear", llama, llama, other), tmp_path / "out")
    assert "weight has shape (100, 32)" in str(error.value)
    assert "(64, 32)" in str(error.value)
    assert_nothing_written(tmp_path)


def test_architecture_mismatch(make_checkpoint, tmp_path):
    llama, gpt2 = make_checkpoint("llama", seed=0), make_checkpoint("gpt2", seed=0)
    with pytest.raises(ShapeMismatchError, match="architectures differ"):
        merge(recipe_for("linear", llama, llama, gpt2), tmp_path / "out")
    assert_nothing_written(tmp_path)


def test_nan_input_names_the_file(trio, tmp_path):
    base, a, b = trio
    path = b / "model.safetensors"
    state = load_file(path)
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        merge(recipe_for("ties", base, a, b), tmp_path / "out")
    assert "model.layers.1.mlp.up_proj.weight" in str(error.value)
    assert str(path) in str(error.value)
    assert_nothing_written(tmp_path)


def test_truncated_safetensors_names_the_file(trio, tmp_path):
    base, a, b = trio
    path = a / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=str(path)):
        merge(recipe_for("ties", base, a, b), tmp_path / "out")
    assert_nothing_written(tmp_path)


def test_existing_output_is_kept_unless_forced(trio, tmp_path):
    base, a, b = trio
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(Exception, match="--force|overwrite"):
        merge(recipe_for("linear", base, a, b), out)
    assert (out / "precious.txt").read_text() == "keep me"
    merge(recipe_for("linear", base, a, b), out, overwrite=True)
    assert not (out / "precious.txt").exists()
    assert (out / "config.json").exists()


# --- command line -----------------------------------------------------------------------------


def test_cli_methods_json_lists_every_method_with_parameters():
    result = CliRunner().invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    methods = {m["name"]: m for m in json.loads(result.output)}
    assert {"ties", "dare_ties", "slerp", "geometric_median", "lora_svd"} <= set(methods)
    ties = {p["name"]: p for p in methods["ties"]["parameters"]}
    assert methods["ties"]["base_model"] == "required"
    assert ties["weight"]["scope"] == "per-model" and ties["weight"]["required"]


def test_cli_merge_and_its_errors(trio, tmp_path):
    import yaml

    base, a, b = trio
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for("ties", base, a, b)))
    runner = CliRunner()
    dry = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "out"), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "valid" in dry.output and not (tmp_path / "out").exists()
    done = runner.invoke(
        app, ["merge", str(recipe), "--out", str(tmp_path / "out"), "--threads", "1"]
    )
    assert done.exit_code == 0, done.output
    assert forward_is_finite(tmp_path / "out")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**recipe_for("ties", base, a, b), "merge_method": "tis"}))
    failed = runner.invoke(app, ["merge", str(bad), "--out", str(tmp_path / "bad-out")])
    assert failed.exit_code == 2
    assert "Did you mean 'ties'" in failed.output
    assert not (tmp_path / "bad-out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["linear", "ties", "slerp", "geometric_median", "model_stock"])
def test_cuda_merge_equals_cpu_merge(make_checkpoint, tmp_path, method):
    base = make_checkpoint("llama", seed=0)
    a, b = make_checkpoint("llama", 1, base=base), make_checkpoint("llama", 2, base=base)
    c = make_checkpoint("llama", 3, base=base)
    recipe = recipe_for(method, base, a, b, c)
    merge(recipe, tmp_path / "cpu")
    merge(recipe, tmp_path / "cuda", device="cuda")
    cpu = load_state(tmp_path / "cpu")
    for name, tensor in load_state(tmp_path / "cuda").items():
        torch.testing.assert_close(tensor, cpu[name], rtol=1e-4, atol=1e-5)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def small_chunks(monkeypatch):
    """Staging buffers of 4 KiB, so every tensor of a tiny model crosses several chunks."""
    monkeypatch.setattr("mergearena.checkpoints.staging.CHUNK_BYTES", 4096)


@needs_cuda
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_cuda_merges_bf16_checkpoints_bit_for_bit_like_the_cpu(
    make_checkpoint, make_lora, small_chunks, tmp_path, method
):
    """What people bring (bf16 shards, full fine-tunes and LoRA experts side by side), streamed to
    the GPU through pinned chunks: the deterministic methods write exactly the CPU's bytes."""
    base = make_checkpoint("llama", seed=0, dtype=torch.bfloat16, shards=2)
    full = make_checkpoint("llama", 1, base=base, dtype=torch.bfloat16, shards=3)
    expert = make_lora(base, seed=2)
    recipe = {
        "merge_method": method,
        "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in (full, expert)],
        "dtype": "bfloat16",
    }
    if method == "ties":
        recipe["parameters"] = {"density": 0.5}
    if method != "linear":
        recipe["base_model"] = str(base)
    merge(recipe, tmp_path / "cpu")
    merge(recipe, tmp_path / "cuda", device="cuda")
    cpu = load_state(tmp_path / "cpu")
    cuda = load_state(tmp_path / "cuda")
    assert cuda.keys() == cpu.keys()
    for name, tensor in cuda.items():
        assert tensor.dtype == cpu[name].dtype and torch.equal(tensor, cpu[name]), name


@needs_cuda
def test_a_cuda_merge_names_a_corrupt_checkpoint(trio, small_chunks, tmp_path):
    base, a, b = trio
    path = next(b.glob("*.safetensors"))
    state = load_file(path)
    name = next(key for key in state if key.endswith("up_proj.weight"))
    state[name][1, 2] = float("inf")
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{name} in .*contains NaN or Inf"):
        merge(recipe_for("ties", base, a, b), tmp_path / "out", device="cuda")
    assert_nothing_written(tmp_path)


def test_a_method_refusing_its_parameters_names_the_tensor_and_writes_nothing(trio, tmp_path):
    base, a, b = trio
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": 1.0}},
            {"model": str(b), "parameters": {"weight": -1.0}},
        ],
    }
    with pytest.raises(RecipeError, match="linear cannot merge tensor .*sum to zero"):
        merge(recipe, tmp_path / "out")
    assert_nothing_written(tmp_path)


# --- what people merge: LoRA experts leave most tensors untouched ---------------------------------


def _full_weight_methods_with_two_models():
    from mergearena.methods import all_methods

    for spec in all_methods():
        if spec.output == "tensor" and spec.min_models <= 2 and (spec.max_models or 2) >= 2:
            yield pytest.param(spec, id=spec.name)


@pytest.mark.parametrize("spec", list(_full_weight_methods_with_two_models()))
def test_every_method_merges_lora_experts_into_a_bf16_base_keeping_untouched_tensors(
    spec, make_checkpoint, make_lora, tmp_path
):
    """The zoo's bug, for every method in the registry: two LoRA experts on q/v into a bf16 base.
    Every tensor no adapter targets (embeddings, norms, other projections) is the base's exactly,
    and nothing is NaN."""
    base = make_checkpoint("llama", seed=0, dtype=torch.bfloat16)
    experts = [make_lora(base, seed=seed, r=2) for seed in (1, 2)]
    per_model, global_ = {}, {}
    for parameter in spec.parameters:
        if parameter.required:
            target = per_model if parameter.per_model else global_
            target[parameter.name] = typical_value(parameter)
    recipe = {
        "merge_method": spec.name,
        "models": [{"model": str(expert), "parameters": per_model} for expert in experts],
        "parameters": global_,
        "dtype": "bfloat16",
    }
    if spec.base != "none":
        recipe["base_model"] = str(base)
    merge(recipe, tmp_path / "out")
    merged = load_state(tmp_path / "out")
    original = dict(iter_output_tensors(base))
    for name, tensor in merged.items():
        assert torch.isfinite(tensor.float()).all(), f"{spec.name} wrote NaN/Inf into {name}"
        if "q_proj" not in name and "v_proj" not in name:
            assert torch.equal(tensor, original[name]), f"{spec.name} moved untouched {name}"


def test_a_method_overflowing_to_inf_stops_the_merge_naming_method_and_tensor(trio, tmp_path):
    base, a, b = trio
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 3e38}} for p in (a, b)],
        "parameters": {"normalize": False},
    }
    with pytest.raises(MergeError) as error:
        merge(recipe, tmp_path / "out")
    message = str(error.value)
    assert "linear produced NaN or Inf" in message
    assert re.search(r"of tensor model\.\S+\.weight", message)
    assert "nothing was written" in message
    assert_nothing_written(tmp_path)


def test_a_nan_in_an_adapter_is_blamed_on_it_in_one_form_by_either_kind_of_merge(
    make_checkpoint, make_lora, tmp_path
):
    """A full-weight merge and an adapter merge find the NaN in different places (the applied
    delta, the factors) but blame the adapter the same way: one rule, one message."""
    base = make_checkpoint("llama", seed=0)
    good, bad = make_lora(base, seed=1), make_lora(base, seed=2)
    path = bad / "adapter_model.safetensors"
    state = load_file(path)
    name = next(key for key in state if "lora_B" in key)
    state[name][0, 0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    for method in ("task_arithmetic", "lora_concat"):
        recipe = {
            "merge_method": method,
            "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in (good, bad)],
        }
        if method == "task_arithmetic":
            recipe["base_model"] = str(base)
        with pytest.raises(CheckpointError) as error:
            merge(recipe, tmp_path / "out")
        assert f" in {bad} contains NaN or Inf values; the " in str(error.value)
        assert str(error.value).endswith("is corrupt or diverged, so it cannot be merged")
        assert_nothing_written(tmp_path)


def test_an_adapter_merge_overflowing_to_inf_stops_with_nothing_written(
    make_checkpoint, make_lora, tmp_path
):
    base = make_checkpoint("llama", seed=0)
    adapters = [make_lora(base, seed=seed) for seed in (1, 2)]
    recipe = {
        "merge_method": "lora_concat",
        "models": [{"model": str(p), "parameters": {"weight": 3e38}} for p in adapters],
    }
    with pytest.raises(MergeError, match="lora_concat produced NaN or Inf"):
        merge(recipe, tmp_path / "out")
    assert_nothing_written(tmp_path)
