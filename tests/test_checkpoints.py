"""Checkpoint I/O: lazy reading, PEFT LoRA adapters, streamed shards, atomic outputs, model refs."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergearena.checkpoints import (
    Checkpoint,
    LoraAdapter,
    StreamingShardWriter,
    atomic_directory,
    copy_support_files,
    is_adapter_dir,
    model_ref_exists,
    resolve_model_ref,
    write_adapter,
)
from mergearena.checkpoints.lora import _alpha_for_scale
from mergearena.errors import CheckpointError, ShapeMismatchError
from mergearena.methods.registry import LoraFactors

# --- reading -------------------------------------------------------------------------------------


def read_all(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    return {name: checkpoint.get(name) for name in checkpoint.tensors}


def data_start(file: Path) -> int:
    return 8 + int.from_bytes(file.read_bytes()[:8], "little")


def test_single_and_sharded_checkpoints_read_the_same_tensors(make_checkpoint):
    single = make_checkpoint("llama", seed=0)
    sharded = make_checkpoint("llama", seed=0, shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    with Checkpoint.open(single) as one, Checkpoint.open(sharded) as many:
        assert one.tensors.keys() == many.tensors.keys()
        assert len({info.file for info in many.tensors.values()}) >= 3
        files_in_order = [info.file.name for info in many.tensors.values()]
        assert files_in_order == sorted(files_in_order)  # file order: by shard, then offset
        expected = load_file(single / "model.safetensors")
        for name, info in many.tensors.items():
            assert info.shape == tuple(expected[name].shape) and info.dtype == torch.float32
            assert torch.equal(one.get(name), expected[name])
            assert torch.equal(many.get(name), expected[name])
        assert one.config["model_type"] == "llama"


def test_tensors_are_listed_in_offset_order_within_a_file(make_checkpoint):
    directory = make_checkpoint("gpt2")
    header = json.loads(
        (directory / "model.safetensors").read_bytes()[
            8 : data_start(directory / "model.safetensors")
        ]
    )
    by_offset = sorted(
        (entry["data_offsets"][0], name) for name, entry in header.items() if name != "__metadata__"
    )
    with Checkpoint.open(directory) as checkpoint:
        assert list(checkpoint.tensors) == [name for _, name in by_offset]


def test_open_reads_no_tensor_data(make_checkpoint):
    directory = make_checkpoint("llama")
    file = directory / "model.safetensors"
    raw = bytearray(file.read_bytes())
    start = data_start(file)
    raw[start:] = b"\xff" * (len(raw) - start)  # garbage data, intact header
    file.write_bytes(bytes(raw))
    with Checkpoint.open(directory) as checkpoint:
        info = checkpoint.tensors["model.layers.0.self_attn.q_proj.weight"]
        assert info.shape == (32, 32) and info.file == file
        assert torch.isnan(checkpoint.get("model.layers.0.self_attn.q_proj.weight")).all()


def test_get_returns_a_tensor_the_caller_owns(make_checkpoint):
    with Checkpoint.open(make_checkpoint("llama")) as checkpoint:
        name = "model.layers.0.self_attn.q_proj.weight"
        first = checkpoint.get(name)
        original = first.clone()
        first.zero_()  # must not leak into the file mapping that later reads share
        assert torch.equal(checkpoint.get(name), original)


def test_truncated_file_is_reported_with_its_name(make_checkpoint):
    directory = make_checkpoint("llama")
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        Checkpoint.open(directory)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda raw: raw[:8] + b"{not json" + raw[17:], "header is not valid JSON"),
        (lambda raw: (2**62).to_bytes(8, "little") + raw[8:], "header length .* not plausible"),
        (lambda raw: raw[:4], "only 4 bytes long"),
        (lambda raw: raw + b"\x00" * 8, "tensors end at data byte"),
    ],
    ids=["bad-json", "huge-header-length", "tiny-file", "trailing-bytes"],
)
def test_corrupt_safetensors_files_are_reported_with_their_name(make_checkpoint, corrupt, message):
    directory = make_checkpoint("llama")
    file = directory / "model.safetensors"
    file.write_bytes(corrupt(file.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as error:
        Checkpoint.open(directory)
    assert str(error.value).startswith(str(file)) and "re-download or re-save" in str(error.value)


def write_raw_safetensors(directory: Path, header: dict, data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file = directory / "model.safetensors"
    file.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    return file


def test_unknown_dtype_names_file_and_tensor(tmp_path):
    write_raw_safetensors(
        tmp_path, {"odd": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\x00"
    )
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'odd' has dtype 'F4'"):
        Checkpoint.open(tmp_path)


def test_overlapping_tensors_are_reported(tmp_path):
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    write_raw_safetensors(tmp_path, {"a": entry, "b": entry}, b"\x00" * 4)
    with pytest.raises(CheckpointError, match="overlap or leave gaps"):
        Checkpoint.open(tmp_path)


def test_missing_shard_names_the_shard_and_the_index(make_checkpoint):
    directory = make_checkpoint("llama", shards=2)
    (directory / "model-00002-of-00003.safetensors").unlink(missing_ok=True)
    (directory / "model-00002-of-00002.safetensors").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=r"model-00002-of-0000\d\.safetensors.*index\.json"):
        Checkpoint.open(directory)


def test_pytorch_bin_loads_with_weights_only(make_checkpoint, tmp_path):
    source = make_checkpoint("gpt2")
    state = load_file(source / "model.safetensors")
    directory = tmp_path / "bin-model"
    directory.mkdir()
    torch.save(state, directory / "pytorch_model.bin")
    with Checkpoint.open(directory) as checkpoint:
        assert checkpoint.tensors.keys() == state.keys()
        name = "transformer.h.0.attn.c_attn.weight"
        tensor = checkpoint.get(name)
        assert torch.equal(tensor, state[name])
        tensor.zero_()  # callers get their own copy
        assert torch.equal(checkpoint.get(name), state[name])


def test_sharded_pytorch_bin_follows_its_index(make_checkpoint, tmp_path):
    state = load_file(make_checkpoint("llama") / "model.safetensors")
    names = list(state)
    halves = {"first.bin": names[: len(names) // 2], "second.bin": names[len(names) // 2 :]}
    weight_map = {}
    for file, part in halves.items():
        torch.save({name: state[name] for name in part}, tmp_path / file)
        weight_map.update(dict.fromkeys(part, file))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with Checkpoint.open(tmp_path) as checkpoint:
        assert set(checkpoint.tensors) == set(names)
        assert all(torch.equal(checkpoint.get(name), state[name]) for name in names)
    (tmp_path / "second.bin").unlink()
    with pytest.raises(CheckpointError, match=r"second\.bin.*pytorch_model\.bin\.index\.json"):
        Checkpoint.open(tmp_path)


class NotATensor:
    """Unpickling this needs code from this module, which weights_only refuses."""


def test_pytorch_bin_with_pickled_code_is_refused(tmp_path):
    torch.save({"weight": torch.ones(2), "extra": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refusing.*safetensors"):
        Checkpoint.open(tmp_path)


def test_directory_without_weights_lists_what_was_looked_for(make_checkpoint, make_lora, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors.*pytorch_model.bin"):
        Checkpoint.open(tmp_path)
    with pytest.raises(CheckpointError, match="PEFT adapter"):
        Checkpoint.open(make_lora(make_checkpoint("llama")))


def test_unknown_tensor_names_checkpoint_and_tensor(make_checkpoint):
    directory = make_checkpoint("llama")
    with Checkpoint.open(directory) as checkpoint:
        with pytest.raises(CheckpointError, match=rf"{directory}.*'model.no_such.weight'"):
            checkpoint.get("model.no_such.weight")


def test_num_layers_and_layer_index(make_checkpoint):
    with Checkpoint.open(make_checkpoint("llama")) as llama:
        assert llama.num_layers == 2
    with Checkpoint.open(make_checkpoint("gpt2")) as gpt2:
        assert gpt2.num_layers == 2
    assert Checkpoint.layer_index("model.layers.1.mlp.up_proj.weight") == 1
    assert Checkpoint.layer_index("transformer.h.0.attn.c_attn.weight") == 0
    assert Checkpoint.layer_index("encoder.block.3.layer.1.DenseReluDense.wi.weight") == 1
    assert Checkpoint.layer_index("vision.blocks.12.attn.qkv.weight") == 12
    assert Checkpoint.layer_index("model.embed_tokens.weight") is None


def test_get_is_safe_from_a_background_thread(make_checkpoint):
    directory = make_checkpoint("llama", shards=3)
    with Checkpoint.open(directory) as checkpoint:
        names = list(checkpoint.tensors) * 5
        background: dict[str, torch.Tensor] = {}
        thread = threading.Thread(
            target=lambda: background.update({n: checkpoint.get(n) for n in names})
        )
        thread.start()
        foreground = {name: checkpoint.get(name) for name in reversed(names)}
        thread.join()
        assert all(torch.equal(background[name], foreground[name]) for name in checkpoint.tensors)


# --- LoRA adapters -------------------------------------------------------------------------------


def peft_merged_state(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The weights PEFT itself produces: ``PeftModel.from_pretrained(...).merge_and_unload()``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()}


def our_merged_state(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Merged weights from our reader: full replacement or base, plus the LoRA delta."""
    merged = {}
    with Checkpoint.open(base_dir) as base, LoraAdapter.open(adapter_dir) as adapter:
        assert adapter.target_weight_names() <= set(base.tensors)
        for name, info in base.tensors.items():
            weight = adapter.full_tensor(name)
            weight = base.get(name) if weight is None else weight
            delta = adapter.delta(name, info.shape)
            merged[name] = weight if delta is None else weight + delta
    return merged


LORA_CASES = {
    "llama": ("llama", {}),
    "llama-rslora": ("llama", {"r": 8, "alpha": 4, "rslora": True}),
    "llama-rank-and-alpha-patterns": (
        "llama",
        {
            "targets": ("q_proj", "v_proj", "down_proj"),
            "rank_pattern": {"layers.1.self_attn.q_proj": 2, "down_proj": 6},
            # Regex keys; the first match in the saved config wins. PEFT saves keys sorted, so
            # layer 0's v_proj takes 7 ("layers.0.s..." sorts before "layers\\.0...").
            "alpha_pattern": {r"layers\.0\..*v_proj": 5, "layers.0.self_attn.v_proj": 7},
        },
    ),
    "llama-embedding-and-modules-to-save": (
        "llama",
        {"targets": ("embed_tokens", "o_proj"), "modules_to_save": ["lm_head"]},
    ),
    "gpt2-fan-in-fan-out": ("gpt2", {"targets": ("c_attn", "c_proj", "c_fc")}),
    "gpt2-rslora-rank-pattern": (
        "gpt2",
        {"targets": ("c_attn",), "rslora": True, "rank_pattern": {"h.1.attn.c_attn": 2}},
    ),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_deltas_match_peft_merge_and_unload(make_checkpoint, make_lora, case):
    kind, options = LORA_CASES[case]
    base = make_checkpoint(kind, seed=0)
    adapter_dir = make_lora(base, seed=1, **options)
    expected = peft_merged_state(base, adapter_dir)
    ours = our_merged_state(base, adapter_dir)
    assert ours.keys() <= expected.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)


def test_lora_module_metadata_follows_patterns(make_checkpoint, make_lora):
    base = make_checkpoint("llama")
    options = LORA_CASES["llama-rank-and-alpha-patterns"][1]
    with LoraAdapter.open(make_lora(base, **options)) as adapter:
        q0 = adapter.modules["model.layers.0.self_attn.q_proj.weight"]
        q1 = adapter.modules["model.layers.1.self_attn.q_proj.weight"]
        v0 = adapter.modules["model.layers.0.self_attn.v_proj.weight"]
        assert (q0.rank, q0.alpha, q0.scale) == (4, 8, 2.0)
        assert (q1.rank, q1.scale) == (2, 4.0)
        assert (v0.rank, v0.alpha) == (4, 7)
        assert adapter.modules["model.layers.1.self_attn.v_proj.weight"].alpha == 8
        assert adapter.modules["model.layers.1.mlp.down_proj.weight"].rank == 6
        factors = adapter.factors("model.layers.1.self_attn.q_proj.weight")
        assert factors.down.shape == (2, 32) and factors.up.shape == (32, 2)


def test_lora_delta_is_none_for_untouched_tensors_and_checks_shape(make_checkpoint, make_lora):
    base = make_checkpoint("llama")
    with LoraAdapter.open(make_lora(base)) as adapter:
        assert adapter.delta("model.layers.0.mlp.up_proj.weight", (64, 32)) is None
        with pytest.raises(ShapeMismatchError, match=r"q_proj\.weight.*\[32, 32\].*\[16, 32\]"):
            adapter.delta("model.layers.0.self_attn.q_proj.weight", (16, 32))
        with pytest.raises(CheckpointError, match="no LoRA module"):
            adapter.factors("model.layers.0.mlp.up_proj.weight")
        assert adapter.base_model_name_or_path == str(base)


def test_lora_adapter_bin_reads_like_safetensors(make_checkpoint, make_lora):
    base = make_checkpoint("llama")
    adapter_dir = make_lora(base)
    expected = our_merged_state(base, adapter_dir)
    state = load_file(adapter_dir / "adapter_model.safetensors")
    (adapter_dir / "adapter_model.safetensors").unlink()
    torch.save(state, adapter_dir / "adapter_model.bin")
    assert is_adapter_dir(adapter_dir) and not is_adapter_dir(base)
    for name, tensor in our_merged_state(base, adapter_dir).items():
        assert torch.equal(tensor, expected[name]), name


def test_lora_keys_with_adapter_names_and_without_peft_prefix(make_checkpoint, make_lora):
    base = make_checkpoint("llama")
    adapter_dir = make_lora(base)
    expected = our_merged_state(base, adapter_dir)
    state = load_file(adapter_dir / "adapter_model.safetensors")
    renamed = {
        key.removeprefix("base_model.model.").replace(".weight", ".default.weight"): tensor
        for key, tensor in state.items()
    }
    save_file(renamed, adapter_dir / "adapter_model.safetensors")
    assert our_merged_state(base, adapter_dir).keys() == expected.keys()
    for name, tensor in our_merged_state(base, adapter_dir).items():
        assert torch.equal(tensor, expected[name]), name


def test_dora_and_other_adapter_types_are_refused(make_checkpoint, make_lora):
    base = make_checkpoint("llama")
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: use_dora is set"):
        LoraAdapter.open(make_lora(base, use_dora=True))
    adapter_dir = make_lora(base)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))
    with pytest.raises(CheckpointError, match="peft_type is LOHA"):
        LoraAdapter.open(adapter_dir)


@pytest.mark.parametrize("rank", [1, 3, 7, 12, 64])
@pytest.mark.parametrize("scale", [0.1, 1 / 3, 2.0, 0.7071067811865476, 1e-3, -0.25])
def test_alpha_for_scale_reproduces_the_scale_to_the_last_bit(scale, rank):
    alpha = _alpha_for_scale(scale, rank)
    if (scale, rank) in {(0.1, 3), (0.1, 12)}:  # no float alpha gives alpha / rank == scale
        assert abs(alpha / rank - scale) <= math.ulp(scale)
    else:
        assert alpha / rank == scale


WRITE_ADAPTER_CASES = {
    "llama": (
        "llama",
        "model.layers.0.self_attn.q_proj.weight",
        {
            "targets": ("q_proj", "v_proj", "embed_tokens"),
            "rslora": True,
            "rank_pattern": {"v_proj": 2},
            "alpha_pattern": {"layers.1.self_attn.q_proj": 3},
        },
    ),
    "gpt2": ("gpt2", "transformer.h.0.attn.c_attn.weight", {"targets": ("c_attn", "c_proj")}),
}


@pytest.mark.parametrize("case", list(WRITE_ADAPTER_CASES))
def test_write_adapter_round_trips_and_loads_in_peft(make_checkpoint, make_lora, tmp_path, case):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kind, odd_module, options = WRITE_ADAPTER_CASES[case]
    base = make_checkpoint(kind)
    with LoraAdapter.open(make_lora(base, **options)) as adapter:
        modules = {
            name: (adapter.factors(name), adapter.is_embedding(name))
            for name in adapter.target_weight_names()
        }
        extra_config = {"fan_in_fan_out": adapter.config["fan_in_fan_out"]}
        transposed = {
            name: m.is_embedding or m.fan_in_fan_out for name, m in adapter.modules.items()
        }
    # An odd scale that is not alpha/r for any round alpha.
    factors = modules[odd_module][0]
    modules[odd_module] = (LoraFactors(factors.down, factors.up, 0.1), False)
    written = write_adapter(tmp_path / "written", modules, str(base), extra_config=extra_config)

    with LoraAdapter.open(written) as reread:
        assert reread.target_weight_names() == modules.keys()
        for weight_name, (factors, is_embedding) in modules.items():
            again = reread.factors(weight_name)
            assert again.scale == factors.scale, weight_name  # exact, not approximately
            assert torch.equal(again.down, factors.down) and torch.equal(again.up, factors.up)
            assert reread.is_embedding(weight_name) == is_embedding

    # What the factors say: base weights plus each module's delta, in a plain model.
    expected_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    state = expected_model.state_dict()
    with torch.no_grad():
        for weight_name, (factors, _) in modules.items():
            delta = factors.delta()
            state[weight_name].add_(delta.T if transposed[weight_name] else delta)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), written
    )
    tokens = torch.tensor([[1, 5, 9, 30, 77, 2]])
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(tokens).logits, expected_model(tokens).logits, rtol=0, atol=1e-5
        )


def test_write_adapter_refuses_settings_that_would_change_scales(tmp_path):
    factors = LoraFactors(torch.ones(2, 4), torch.ones(4, 2), 1.0)
    with pytest.raises(CheckpointError, match="lora_alpha"):
        write_adapter(
            tmp_path / "a", {"x.weight": (factors, False)}, extra_config={"lora_alpha": 2}
        )
    with pytest.raises(ShapeMismatchError, match="do not chain"):
        bad = LoraFactors(torch.ones(2, 4), torch.ones(4, 3), 1.0)
        write_adapter(tmp_path / "b", {"x.weight": (bad, False)})


# --- writing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 20_000], ids=["one-shard", "sharded"])
def test_streaming_writer_output_loads_in_safetensors_and_transformers(
    make_checkpoint, tmp_path, dtype, max_shard_bytes
):
    from transformers import AutoModelForCausalLM

    source = make_checkpoint("llama")
    out = tmp_path / "out"
    with Checkpoint.open(source) as checkpoint:
        plan = [(name, info.shape, dtype) for name, info in checkpoint.tensors.items()]
        expected = {name: checkpoint.get(name).to(dtype) for name in checkpoint.tensors}
    writer = StreamingShardWriter(out, plan, max_shard_bytes=max_shard_bytes, metadata={"k": "v"})
    for name, _, _ in plan:
        writer.write(name, expected[name])
    writer.close()
    copy_support_files(source, out)

    files = sorted(out.glob("*.safetensors"))
    if max_shard_bytes > 2**20:
        assert [f.name for f in files] == ["model.safetensors"]
        assert not (out / "model.safetensors.index.json").exists()
    else:
        assert len(files) > 1 and files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["weight_map"].keys() == expected.keys()
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in expected.values()
        )
    for file in files:
        assert (data_start(file) - 8) % 8 == 0
        with safe_open(file, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt", "k": "v"}
            for name in handle.keys():
                assert torch.equal(handle.get_tensor(name), expected[name])
    with Checkpoint.open(out) as reread:
        assert list(reread.tensors) == list(expected)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    state = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_streaming_writer_checks_names_shape_dtype_and_completeness(tmp_path):
    plan = [("a", (2, 3), torch.float32), ("b", (4,), torch.bfloat16)]
    writer = StreamingShardWriter(tmp_path / "w", plan)
    with pytest.raises(CheckpointError, match="'c' is not in the write plan"):
        writer.write("c", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ShapeMismatchError, match=r"'a' has shape \[3, 2\].*\[2, 3\]"):
        writer.write("a", torch.zeros(3, 2))
    with pytest.raises(CheckpointError, match="'a' has dtype torch.float16"):
        writer.write("a", torch.zeros(2, 3, dtype=torch.float16))
    writer.write("a", torch.zeros(2, 3))
    with pytest.raises(CheckpointError, match="'a' was written twice"):
        writer.write("a", torch.ones(2, 3))
    with pytest.raises(CheckpointError, match="1 planned tensors were never written.*'b'"):
        writer.close()


def test_streaming_writer_puts_tensors_in_place_whatever_the_order_and_thread(tmp_path):
    """The merge's writer threads finish in any order; the shards read back as planned."""
    from concurrent.futures import ThreadPoolExecutor

    tensors = {f"t{i}": torch.randn(i + 1, 7).to(torch.bfloat16) for i in range(40)}
    plan = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = StreamingShardWriter(tmp_path / "w", plan, max_shard_bytes=400)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda name: writer.write(name, tensors[name]), reversed(list(tensors))))
    writer.close()
    with Checkpoint.open(tmp_path / "w") as checkpoint:
        assert list(checkpoint.tensors) == list(tensors)  # plan order, in several shards
        assert len({info.file for info in checkpoint.tensors.values()}) > 1
        for name, tensor in tensors.items():
            assert torch.equal(checkpoint.get(name), tensor), name


def test_streaming_writer_handles_scalars_and_empty_tensors(tmp_path):
    tensors = {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "ints": torch.arange(5)}
    plan = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with StreamingShardWriter(tmp_path / "w", plan) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    loaded = load_file(tmp_path / "w" / "model.safetensors")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "mergearena-" in p.name)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_directory(out) as directory:
            (directory / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert not out.exists() and leftovers(tmp_path) == []


def test_atomic_directory_publishes_on_success(tmp_path):
    out = tmp_path / "nested" / "merged"
    with atomic_directory(out) as directory:
        assert directory.parent == out.parent and directory.name.startswith(".merged.")
        assert not out.exists()
        (directory / "config.json").write_text("{}")
    assert (out / "config.json").read_text() == "{}" and leftovers(out.parent) == []


def test_atomic_directory_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    entered = False
    with pytest.raises(CheckpointError, match="already exists.*--force"):
        with atomic_directory(out):
            entered = True
    assert not entered and (out / "old.txt").exists() and leftovers(tmp_path) == []

    with pytest.raises(ValueError):
        with atomic_directory(out, overwrite=True) as directory:
            (directory / "new.txt").write_text("new")
            raise ValueError("failed midway")
    assert (out / "old.txt").exists() and leftovers(tmp_path) == []

    with atomic_directory(out, overwrite=True) as directory:
        (directory / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and leftovers(tmp_path) == []


def test_atomic_directory_never_replaces_a_file_or_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("keep")
    with pytest.raises(CheckpointError, match="is a file"):
        with atomic_directory(tmp_path / "a-file", overwrite=True):
            pass
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="working directory"):
        with atomic_directory(".", overwrite=True):
            pass
    assert (tmp_path / "a-file").read_text() == "keep" and leftovers(tmp_path) == []


def test_copy_support_files_copies_config_and_a_working_tokenizer(make_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    source = make_checkpoint("llama")
    copied = copy_support_files(source, tmp_path / "out")
    names = {path.name for path in copied}
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= names
    text = "the water is long"
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "out")(text).input_ids
        == AutoTokenizer.from_pretrained(source)(text).input_ids
    )
    only_tokenizer = copy_support_files(source, tmp_path / "tok", config=False)
    assert "config.json" not in {path.name for path in only_tokenizer}


# --- model references ----------------------------------------------------------------------------


def test_local_directories_resolve_to_themselves(make_checkpoint):
    directory = make_checkpoint("llama")
    assert resolve_model_ref(str(directory)) == directory
    assert model_ref_exists(str(directory))


def test_zoo_refs_resolve_in_the_mergearena_cache(tmp_path, monkeypatch):
    from mergearena.zoo.base import write_manifest

    monkeypatch.setenv("MERGEARENA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="zoo:smollm2-135m is not ready.*zoo prepare"):
        resolve_model_ref("zoo:smollm2-135m")
    assert not model_ref_exists("zoo:smollm2-135m")
    directory = tmp_path / "cache" / "zoo" / "smollm2-135m"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    write_manifest(directory)
    assert resolve_model_ref("zoo:smollm2-135m") == directory


def fake_hub_snapshot(cache: Path, repo_id: str, commit: str = "a" * 40) -> Path:
    """The layout huggingface_hub leaves after a download: blobs aside, snapshots/<commit>/..."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_ids_resolve_from_the_local_cache_only(hf_hub_cache):
    snapshot = fake_hub_snapshot(hf_hub_cache, "org/tiny-model")
    assert resolve_model_ref("org/tiny-model").resolve() == snapshot.resolve()
    assert resolve_model_ref("org/tiny-model@main").resolve() == snapshot.resolve()
    assert resolve_model_ref(f"org/tiny-model@{'a' * 40}").resolve() == snapshot.resolve()
    with pytest.raises(CheckpointError, match="'org/absent' is not in .*hf-hub-cache"):
        resolve_model_ref("org/absent")
    with pytest.raises(CheckpointError, match="revision 'v2'"):
        resolve_model_ref("org/tiny-model@v2")
    assert not model_ref_exists("org/absent")


def test_unrecognised_refs_say_what_was_tried(tmp_path):
    with pytest.raises(CheckpointError, match="local directory.*zoo:NAME.*hub id"):
        resolve_model_ref("not a model!")
    with pytest.raises(CheckpointError, match="local directory"):
        resolve_model_ref(str(tmp_path / "missing" / "deeper" / "dir"))


def test_tensor_info_sizes(make_checkpoint):
    with Checkpoint.open(make_checkpoint("llama", dtype=torch.bfloat16)) as checkpoint:
        info = checkpoint.tensors["model.layers.0.mlp.up_proj.weight"]
        assert info.dtype == torch.bfloat16 and info.shape == (64, 32)
        assert info.nbytes == math.prod(info.shape) * 2
