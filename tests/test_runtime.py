"""Process-level settings: the attention kernel switch reaches SDPA, and refuses what cannot run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from gpt2.config import SDPA_BACKENDS, resolve
from gpt2.errors import ConfigError
from gpt2.model import GPT
from gpt2.runtime import select_sdpa_backend
from gpt2.trainer.loop import Trainer
from tests.conftest import CUDA, OpNames, small_gpt_config

# The aten op each SDPA kernel runs as, per device (what a dispatch mode sees below F.sdpa).
KERNEL_OPS = {
    ("cpu", "flash"): "_scaled_dot_product_flash_attention_for_cpu",
    ("cuda", "flash"): "_scaled_dot_product_flash_attention",
    ("cuda", "cudnn"): "_scaled_dot_product_cudnn_attention",
    ("cuda", "efficient"): "_scaled_dot_product_efficient_attention",
}


@pytest.fixture(autouse=True)
def _restore_kernels() -> Iterator[None]:
    yield
    select_sdpa_backend("auto", torch.device("cpu"))


def _attention_ops(device: str, backend: str) -> tuple[set[str], torch.Tensor]:
    """The SDPA ops one forward/backward of a small model runs, and its loss."""
    select_sdpa_backend(backend, torch.device(device))
    torch.manual_seed(0)
    model = GPT(small_gpt_config()).to(device)
    x = torch.randint(0, 96, (2, 32), device=device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # cuDNN attention wants half types
    with OpNames() as ops, torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
        loss = model(x, x)
        loss.backward()
    return {n.split(".")[0] for n in ops.names if "scaled_dot_product" in n}, loss.detach().float()


@pytest.mark.parametrize("name", SDPA_BACKENDS)
def test_a_named_kernel_is_the_only_one_enabled_and_auto_enables_all(name) -> None:
    device = torch.device("cuda" if name in ("cudnn", "efficient") else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    select_sdpa_backend(name, device)
    b = torch.backends.cuda
    enabled = {
        "flash": b.flash_sdp_enabled(),
        "cudnn": b.cudnn_sdp_enabled(),
        "efficient": b.mem_efficient_sdp_enabled(),
        "math": b.math_sdp_enabled(),
    }
    assert enabled == {k: name in ("auto", k) for k in enabled}


@pytest.mark.parametrize("name", ["cudnn", "efficient"])
def test_cuda_only_kernels_are_refused_on_cpu(name) -> None:
    with pytest.raises(ConfigError, match=f"--sdpa-backend {name} needs CUDA"):
        select_sdpa_backend(name, torch.device("cpu"))


def test_the_switch_reaches_attention_and_changes_only_the_kernel() -> None:
    flash_ops, flash_loss = _attention_ops("cpu", "flash")
    math_ops, math_loss = _attention_ops("cpu", "math")
    auto_ops, _ = _attention_ops("cpu", "auto")
    assert KERNEL_OPS["cpu", "flash"] in flash_ops and KERNEL_OPS["cpu", "flash"] in auto_ops
    assert KERNEL_OPS["cpu", "flash"] not in math_ops  # the math path: plain matmuls and softmax
    torch.testing.assert_close(math_loss, flash_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["flash", "cudnn", "efficient"])
@CUDA
def test_each_cuda_kernel_runs_when_named(name) -> None:
    ops, loss = _attention_ops("cuda", name)
    assert KERNEL_OPS["cuda", name] in ops, ops
    assert torch.isfinite(loss)


def test_the_trainer_selects_the_configured_kernel(tiny_flags) -> None:
    trainer = Trainer(resolve(dict(tiny_flags, sdpa_backend="math")))
    assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert trainer.dry_run()["loss"] > 0
    with pytest.raises(ConfigError, match="needs CUDA"):
        Trainer(resolve(dict(tiny_flags, sdpa_backend="cudnn")))


@pytest.mark.parametrize(
    "amx,avx512_bf16,speedup,expected",
    [
        (True, False, 0.0, torch.bfloat16),
        (False, True, 2.4, torch.bfloat16),  # AMD EPYC: the tiny step 2.4x faster in bf16
        (False, True, 0.7, torch.float32),  # Xeon without AMX: bf16 slower (measured)
        (False, False, 9.9, torch.float32),  # no bf16 instructions: no probe
    ],
)
def test_auto_dtype_on_cpu_is_bf16_where_bf16_matmuls_are_faster(
    monkeypatch, amx, avx512_bf16, speedup, expected
) -> None:
    from gpt2 import runtime
    from gpt2.runtime import resolve_dtype

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(runtime, "_has_cpu_flag", lambda flag: avx512_bf16 and flag == "avx512_bf16")
    monkeypatch.setattr(runtime, "_bf16_matmul_speedup", lambda: speedup)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    runtime.cpu_has_native_bf16.cache_clear()
    try:
        assert resolve_dtype("auto", torch.device("cpu")) is expected
    finally:
        runtime.cpu_has_native_bf16.cache_clear()
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16  # asked for: given


def test_the_bf16_probe_times_a_real_matmul() -> None:
    from gpt2.runtime import _bf16_matmul_speedup

    assert 0.01 < _bf16_matmul_speedup() < 100
