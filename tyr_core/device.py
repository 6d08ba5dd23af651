"""Where tyr computes (the ``device`` run setting) and the numerics it pins there.

Models compute in their own dtype; Hessians, the local pruner's linear algebra and the refit run in fp32 (fp64
where tyr solves), so TF32 matmuls are turned off: they would round those fp32 products to a 10-bit mantissa.
"""

from __future__ import annotations

import os
import re

import torch

from .errors import ConfigError

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else the CPU; ``cuda`` and ``cuda:N`` must exist.

    Raises:
        ConfigError: on an unknown name or a CUDA device this machine does not have, naming the setting.
    """
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise ConfigError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        index = device.index or 0
        if index >= count:
            raise ConfigError(
                f"device={name!r}, but this machine has {count} CUDA device(s): set device=cpu or device=auto"
            )
    return device


def configure_numerics(device: torch.device, deterministic: bool = False) -> None:
    """TF32 off for fp32 matmuls; with ``deterministic``, cuBLAS's fixed workspace and deterministic kernels, so a
    run on the same GPU reproduces itself bit for bit (at some cost in speed)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def memory_budget(device: torch.device, fraction: float = 0.9) -> int:
    """Bytes a run may plan to hold on ``device``: a fraction of what is free now (0 on the CPU: no device memory)."""
    if device.type != "cuda":
        return 0
    free, _total = torch.cuda.mem_get_info(device)
    return int(free * fraction)
