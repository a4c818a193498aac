"""``--dtype auto``: bfloat16 where the hardware runs it natively, float32 where it is emulated."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from mergearena import dtypes
from mergearena.cli import app
from mergearena.dtypes import choose_dtype
from mergearena.errors import EvaluationError


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch):
    """Pretend bf16 matmuls take ``ratio`` times as long as fp32 ones on this CPU."""

    def pretend(ratio: float) -> None:
        seconds = {torch.float32: 0.01, torch.bfloat16: 0.01 * ratio}
        monkeypatch.setattr(dtypes, "_matmul_seconds", lambda dtype: seconds[dtype])
        dtypes.cpu_choice.cache_clear()

    yield pretend
    dtypes.cpu_choice.cache_clear()


def test_auto_is_float32_on_a_cpu_that_emulates_bfloat16(probe):
    probe(5.5)  # AVX2 only: what this project's CI machines measured
    choice = choose_dtype("auto", "cpu")
    assert choice.dtype == torch.float32
    assert "5.5x slower" in choice.describe("auto")


def test_auto_is_bfloat16_on_a_cpu_with_native_bfloat16(probe):
    probe(0.4)  # AVX512-BF16: bf16 2.5x faster
    assert choose_dtype("auto", "cpu").dtype == torch.bfloat16


def test_auto_is_bfloat16_on_cuda_without_a_probe(probe):
    probe(100.0)
    assert choose_dtype("auto", "cuda").dtype == torch.bfloat16


def test_named_dtypes_are_kept_and_bad_names_are_refused():
    assert choose_dtype("float16", "cpu").dtype == torch.float16
    assert choose_dtype("bfloat16", "cpu").dtype == torch.bfloat16
    with pytest.raises(EvaluationError, match="auto, float32, bfloat16, float16"):
        choose_dtype("fp8", "cpu")


def test_the_probe_measures_this_cpu():
    dtypes.cpu_choice.cache_clear()
    choice = dtypes.cpu_choice()
    assert choice.dtype in (torch.float32, torch.bfloat16)
    assert "matmul" in choice.reason


def test_eval_defaults_to_auto_and_says_what_it_chose(make_checkpoint, tmp_path, probe):
    probe(5.5)
    model = make_checkpoint("llama", seed=0)
    task = tmp_path / "t.csv"
    task.write_text(
        'id,input,target,answer_choices,eval_type\n1,Q,0,"[""a"", ""b""]",multiple_choice\n'
    )
    result = CliRunner().invoke(
        app, ["eval", "--model", str(model), "--tasks", str(task), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert "dtype auto → float32 (no fast bfloat16 on this CPU" in result.output
