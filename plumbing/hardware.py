"""The machine: which device and precision a run gets, what the log says about the hardware, and
the peak-FLOPs table behind MFU."""

from __future__ import annotations

import contextlib
import os
import platform

import numpy as np
import torch

from config import ConfigError


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device: cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
        return torch.device("cuda", local_rank)
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device: mps was asked for but is not available; use --device cpu or auto")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: bf16 on GPUs that support it under 'auto', fp32 elsewhere."""
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for the forward pass; a no-op in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fast_math(device: torch.device) -> str:
    """Process-wide settings every trainer wants, made the same on every thread so that a run's
    arithmetic does not depend on which thread computed what. Returns how subnormals are handled,
    for the log.

    - TF32 matmuls on Ampere and newer GPUs.
    - A fixed intra-op thread count: torch.set_num_threads also turns MKL's dynamic threading off
      (on by default; Intel's conditions for run-to-run reproducibility ask for it off).
    - Subnormals flushed to zero on the CPU: Adam's second moments of tiny gradients go subnormal
      (below 1e-38), which x86 CPUs handle about 100x slower; flushing them took the default run
      from 118 to 96 ms/step. The flush is a per-thread setting that threads inherit when they
      start: set before the first parallel operation (as every program here does), every intra-op
      thread has it. A caller that already ran one (a notebook, a test process) has workers
      without it, and flushing on this thread alone would make results depend on how work is
      split between threads; then nothing is flushed and the returned line says so."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(torch.get_num_threads())
    if not torch.set_flush_denormal(True):
        return "subnormals kept (this CPU cannot flush them)"
    flushed = subnormals_flushed()
    if flushed == 1.0:
        return "subnormals flushed to zero on every thread"
    torch.set_flush_denormal(False)
    return (f"subnormals not flushed: this process's {torch.get_num_threads()} intra-op threads started before "
            f"the flush could be set (it reached {flushed:.0%} of the work); results match a fresh process "
            "only to rounding, and steps may be slower")


def subnormals_flushed() -> float:
    """The share of a parallel multiply of subnormals that came out flushed to zero: 1.0 when every
    intra-op thread flushes, 0.0 when none does, between when only some do. 4M elements, so that
    every thread of a large machine gets a share (torch splits work in grains of 32k). The values
    are made and read as bits: a float constant would be flushed on its way in by this thread."""
    tiny = torch.full((1 << 22,), 1 << 22, dtype=torch.int32).view(torch.float32)  # 2**-127, subnormal
    kept = (tiny * 0.5).view(torch.int32) != 0
    return 1.0 - float(kept.float().mean())


def describe_hosts(hosts: list[str]) -> str:
    """'on 2 hosts: node1 (ranks 0-1), node2 (ranks 2-3)' from each rank's host name, in rank order;
    '' on one host."""
    if len(set(hosts)) < 2:
        return ""
    spans: list[tuple[str, int, int]] = []
    for rank, host in enumerate(hosts):
        if spans and spans[-1][0] == host:
            spans[-1] = (host, spans[-1][1], rank)
        else:
            spans.append((host, rank, rank))
    parts = [f"{host} (rank{'s' if b > a else ''} {a}{f'-{b}' if b > a else ''})" for host, a, b in spans]
    return f" on {len(set(hosts))} hosts: " + ", ".join(parts)


def describe_environment(device: torch.device, world_size: int, hosts: list[str] | None = None, math: str = "") -> str:
    """Versions and hardware, so that a log describes the machine it came from (and, given every
    rank's host name, which ranks ran where)."""
    lines = [
        f"python {platform.python_version()} · torch {torch.__version__} · numpy {np.__version__}",
        f"host {platform.node()} · {platform.platform()} · {os.cpu_count()} CPUs · "
        f"torch threads {torch.get_num_threads()}" + (f" · {math}" if math else ""),
        f"device {device} · world size {world_size}{describe_hosts(hosts or [])}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"gpu {props.name} · {props.total_memory / 2**30:.0f} GiB · "
                     f"CUDA {torch.version.cuda} · cuDNN {torch.backends.cudnn.version()}")
    return "\n".join(lines)


# Peak dense bf16/fp16 tensor-core FLOP/s per GPU (no sparsity), from the vendors' data sheets.
# Matched by substring of torch.cuda.get_device_name(); the first match wins, so specific names
# come before general ones. A GPU not listed gets no MFU rather than a guess.
PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of this GPU; None on CPU, MPS and GPUs missing from the table."""
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_flops_of(gpu_name: str) -> float | None:
    for key, flops in PEAK_FLOPS:
        if key in gpu_name:
            return flops
    return None


def no_mfu_reason(device: torch.device) -> str:
    """Why a run has no MFU figure, for its log."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} is not in hardware.PEAK_FLOPS"
    return f"no peak-FLOPs figure for {device.type}"


def flops_per_token(num_params: int, num_blocks: int, num_heads: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12·L·H·Q·T for attention (PaLM, app. B)."""
    return 6 * num_params + 12 * num_blocks * num_heads * head_dim * seq_len
