"""Throughput arithmetic: model FLOPs per token and utilisation of the accelerator's peak."""

from __future__ import annotations

import torch

from gpt2.model.config import GPTConfig

# Dense bf16/fp16 tensor-core peaks (FLOP/s), by substring of the device name.
_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "B200": 2250e12}


def flops_per_token(config: GPTConfig, n_params: int) -> float:
    """Training FLOPs per token (forward + backward): 6N plus attention's 12·L·C·T (PaLM appendix B)."""
    return 6.0 * n_params + 12.0 * config.n_layer * config.n_embd * config.block_size


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when unknown (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


def mfu(tokens_per_s: float, config: GPTConfig, n_params: int, device: torch.device) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown."""
    peak = peak_flops(device)
    return None if peak is None else tokens_per_s * flops_per_token(config, n_params) / peak
