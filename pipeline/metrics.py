"""Throughput, MFU and memory figures for the training log.

MFU = achieved FLOP/s / peak FLOP/s, with the achieved FLOPs from ``WalshLM.flops_per_token``
(what the structured layers really compute; never 6 * params) and the peak from the table below
(dense bf16 tensor-core peak per device, or ``train.peak_tflops`` when given). fp32 runs on a
GPU use the same bf16 peak, so their MFU reads low on purpose. CPU runs report no MFU.
"""

from __future__ import annotations

import time

import torch

# Dense bf16 peak TFLOP/s (vendor datasheets; no sparsity).
PEAK_TFLOPS = {
    "H100": 989.0,  # SXM; the PCIe part is 756
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "RTX 4090": 165.0,
}


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_TFLOPS.items():
        if key in name:
            return val * (756 / 989 if key == "H100" and "PCIe" in name else 1.0)
    return None


class Throughput:
    """Tokens/s and MFU over the interval since the last ``read``."""

    def __init__(self, flops_per_token: int, world_size: int, peak_tflops: float | None) -> None:
        self.flops_per_token, self.world, self.peak = flops_per_token, world_size, peak_tflops
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tok_s = self.tokens / dt  # global tokens per second
        out = {"tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / self.world}
        if self.peak:
            out["mfu"] = tok_s * self.flops_per_token / (self.world * self.peak * 1e12)
        self.t0, self.tokens = time.perf_counter(), 0
        return out


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {
        "mem_allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
        "mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
    }
