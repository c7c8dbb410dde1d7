"""Pick device, distributed backend and DeepSpeed accelerator from what is present.

One code path for CPU and GPU: nothing else in the project branches on hardware except through
these helpers.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    backend: str  # torch.distributed backend: nccl on CUDA, gloo otherwise
    accelerator: str  # DeepSpeed accelerator name (DS_ACCELERATOR)

    @property
    def is_gpu(self) -> bool:
        return self.device.type == "cuda"


def detect_device(cpu_threads: int | None = None) -> DeviceInfo:
    """Call inside a Ray Train worker, before importing deepspeed (ray-project/ray#50406)."""
    if torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        info = DeviceInfo(device, "nccl", "cuda")
    else:
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        info = DeviceInfo(torch.device("cpu"), "gloo", "cpu")
    # DeepSpeed reads DS_ACCELERATOR once, when it is first imported.
    os.environ.setdefault("DS_ACCELERATOR", info.accelerator)
    return info


def local_device() -> torch.device:
    """The device of a process outside Ray Train (serve replica, eval, SFT driver, bench): its
    GPU when it has one. Ray Train workers use ``detect_device``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def measure_matmul_tflops(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 2048, seconds: float = 1.0, rows: int | None = None
) -> float:
    """Peak-like matmul throughput of this process on ``device``, for MFU's denominator.

    On CPU there is no datasheet peak to quote (it depends on cores, AMX and the thread count the
    worker got), so the guide's rule is to measure it in the same run. ``rows`` < ``n`` times a
    skinny (rows, n) @ (n, n) product instead, the shape of a decode step.

    Takes about ``seconds`` whatever the dtype's speed: on a CPU without bf16 kernels (seen here:
    an EPYC doing bf16 at 0.0003 TFLOP/s against fp32's 0.08) one 2048^3 product would take a
    minute, so the problem grows from 128 towards ``n`` only while a product stays short.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def operands(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = max(1, round((rows or n) * size / n))
        return torch.randn(r, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)

    size = min(n, 128)
    while True:
        a, b = operands(size)
        a @ b  # the first product of a shape pays kernel selection and allocation
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        if size >= n or time.perf_counter() - t0 >= seconds / 32:  # the next size costs 8x more
            break
        size = min(n, size * 2)
    flops = 2 * a.shape[0] * size * size
    # The best of several short windows: a peak, so a burst of contention from another process
    # on a shared machine (CI, a busy node) lowers one window, not the figure.
    window, best, start = seconds / 4, 0.0, time.perf_counter()
    while True:
        iters, w0 = 0, time.perf_counter()
        while True:
            a @ b
            iters += 1
            sync()
            now = time.perf_counter()
            if now - w0 >= window:
                break
        best = max(best, flops * iters / (now - w0) / 1e12)
        if now - start >= seconds:
            return best


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(requested: str, device: torch.device) -> tuple[str, float]:
    """(precision, matmul TFLOP/s in it) for this worker; ``auto`` picks the faster one here.

    Only ``auto`` compares: an explicit precision is measured, not second-guessed. Callers on
    several ranks must agree on the result (``loop.py`` all-reduces the vote).
    """
    if requested != "auto":
        return requested, measure_matmul_tflops(device, DTYPES[requested])
    if device.type == "cuda":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return precision, measure_matmul_tflops(device, DTYPES[precision])
    precision, rates = compare_cpu_precisions(device)
    return precision, rates[precision]


def compare_cpu_precisions(device: torch.device) -> tuple[str, dict[str, float]]:
    """``auto`` on a CPU: the precision to train in and the matmul TFLOP/s of each that decided it.

    CPUs of one machine kind differ (AMX, AVX512-BF16, microcode), so this is measured, never
    assumed: bf16 wins only where it multiplies clearly faster than fp32.
    """
    rates = {name: measure_matmul_tflops(device, DTYPES[name], seconds=0.5) for name in ("bf16", "fp32")}
    return cpu_precision_for(rates), rates


def cpu_precision_for(rates: dict[str, float]) -> str:
    """bf16 where its measured matmul rate beats fp32's by 1.2x (bf16 costs accuracy, so it
    must clearly pay for itself), else fp32."""
    return "bf16" if rates["bf16"] >= 1.2 * rates["fp32"] else "fp32"


def pick_inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """``fp32``/``bf16`` as named; ``auto`` = bf16 where this hardware multiplies faster in it.

    On CUDA that is every GPU with bf16 support; on CPU it depends on AMX / AVX512-BF16, which
    torch does not report, so a decode-shaped matmul is timed in both (``decode_matmul_rates``)
    and bf16 must be 1.25x faster to be chosen.
    """
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[inference_dtype_for(decode_matmul_rates(device))]


def inference_dtype_for(rates: dict[str, float]) -> str:
    """The pure rule of ``auto`` on a CPU: bf16 where it multiplies 1.25x faster than fp32."""
    return "bf16" if rates["bf16"] > 1.25 * rates["fp32"] else "fp32"


def decode_matmul_rates(device: torch.device) -> dict[str, float]:
    """TFLOP/s of a decode-shaped matmul (64 rows x 1024 x 1024) in bf16 and fp32: what ``auto``
    decides on (a few tens of ms, once per serving replica)."""
    return {name: measure_matmul_tflops(device, DTYPES[name], n=1024, seconds=0.05, rows=64) for name in ("bf16", "fp32")}
