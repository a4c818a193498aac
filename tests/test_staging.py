"""Checkpoint bytes a chunk at a time, and through pinned buffers to a GPU and back."""

import pytest
import torch

from mergearena.checkpoints import Checkpoint
from mergearena.errors import CheckpointError


def test_read_into_reassembles_every_tensor_from_uneven_chunks(make_checkpoint):
    directory = make_checkpoint("llama", seed=0, dtype=torch.bfloat16, shards=2)
    with Checkpoint.open(directory) as checkpoint:
        for name, info in checkpoint.tensors.items():
            assert checkpoint.reads_bytes(name)
            whole = checkpoint.get(name)
            raw = torch.empty(info.nbytes, dtype=torch.uint8)
            for start in range(0, info.nbytes, 1000):  # 1000: chunks that split elements
                stop = min(start + 1000, info.nbytes)
                checkpoint.read_into(name, memoryview(raw[start:stop].numpy()), start)
            assert torch.equal(raw.view(info.dtype).reshape(info.shape), whole), name


def test_read_into_refuses_bytes_outside_the_tensor_and_unknown_tensors(make_checkpoint):
    directory = make_checkpoint("llama", seed=0)
    with Checkpoint.open(directory) as checkpoint:
        name, info = next(iter(checkpoint.tensors.items()))
        with pytest.raises(ValueError, match="outside tensor"):
            checkpoint.read_into(name, memoryview(bytearray(8)), info.nbytes - 4)
        assert not checkpoint.reads_bytes("no.such.tensor")
        with pytest.raises(CheckpointError, match="not stored in safetensors"):
            checkpoint.read_into("no.such.tensor", memoryview(bytearray(8)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_a_stager_moves_bytes_to_the_gpu_and_back_unchanged(nbytes):
    from mergearena.checkpoints.staging import Stager

    device = torch.device("cuda")
    stager = Stager(device, chunk_bytes=4096)
    source = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)

    def fill(buffer, start):
        buffer.copy_(source[start : start + len(buffer)])

    on_gpu, uploaded = stager.upload(nbytes, fill)
    torch.cuda.current_stream().wait_event(uploaded)
    assert torch.equal(on_gpu.cpu(), source)
    doubled = (on_gpu.to(torch.int32) * 2).to(torch.uint8)  # work queued on another stream
    ready = torch.cuda.Event()
    ready.record()
    received = bytearray()
    stager.download(doubled, ready, received.extend)
    assert bytes(received) == bytes((source.to(torch.int32) * 2).to(torch.uint8).numpy())
