"""Tokens per second and model FLOPs utilisation (MFU) of the training loop.

MFU = model FLOPs per second / the device's dense bf16 peak. Model FLOPs per processed token (padding included:
the kernels compute it) = the forward FLOPs of dsee_dist.models.flops at the batch's padded length, times 2 for
DSEE and LoRA (forward + the input gradients; the frozen base has no weight gradients, the adapters' are tiny),
times 3 for full fine-tuning (+ the weight gradients). Recomputation under activation checkpointing is not model
work and is not counted. On a CPU, or a GPU not in the table, MFU is reported as n/a (None).
"""

from __future__ import annotations

from dsee_dist.models.flops import flops_per_token

# Dense bf16 tensor-core peaks per device, TFLOPS (vendor data sheets, without sparsity).
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def device_peak_flops() -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s of this rank's device or None, the device's name)."""
    import torch

    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name()
    for key, tflops in BF16_PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return tflops * 1e12, name
    return None, name


def train_flops_per_token(model_config, context: int, method: str) -> float | None:
    """Model FLOPs per processed token of one training step, or None for a model family flops.py does not know."""
    try:
        forward = flops_per_token(model_config, context=max(int(context), 1))["total"]
    except Exception:  # noqa: BLE001 - an unknown family: no MFU, training goes on
        return None
    return forward * (3 if method == "full" else 2)


def mfu(flops_per_token: float | None, tokens_per_s_per_device: float, peak_flops: float | None) -> float | None:
    if flops_per_token is None or peak_flops is None:
        return None
    return flops_per_token * tokens_per_s_per_device / peak_flops


_PEAK: list = []  # (peak FLOP/s, device name), looked up once per process


def interval_metrics(
    model_config,
    method: str,
    *,
    tokens_trained: float,
    tokens_processed: int,
    sequences: int,
    elapsed_s: float,
    world_size: int,
) -> dict:
    """metrics.jsonl values for one logging interval: labelled tokens/s and processed tokens/s (all ranks), and
    MFU per device (None where the device's peak is unknown, e.g. on a CPU)."""
    if not _PEAK:
        _PEAK.append(device_peak_flops())
    peak, _ = _PEAK[0]
    elapsed_s = max(elapsed_s, 1e-9)
    processed_per_s = tokens_processed / elapsed_s
    context = tokens_processed / max(sequences, 1)
    utilisation = mfu(train_flops_per_token(model_config, context, method), processed_per_s / world_size, peak)
    return {
        "tokens_per_s": round(tokens_trained / elapsed_s, 1),
        "processed_tokens_per_s": round(processed_per_s, 1),
        "mfu": None if utilisation is None else round(utilisation, 4),
    }
