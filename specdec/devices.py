"""Device strings of backend options: checked when a config is read (the form) and when a model is
loaded (that this machine has the device), each with one line saying how to fix it."""

from __future__ import annotations

import re
from typing import Annotated

import torch
from pydantic import AfterValidator

from specdec.errors import SpecdecError

_FORM = re.compile(r"cpu|cuda(:\d+)?")


def parse_device(value: str) -> str:
    """The device string itself, if it is cpu, cuda or cuda:N (raises ValueError otherwise)."""
    value = value.strip().lower()
    if not _FORM.fullmatch(value):
        raise ValueError(f"invalid device {value!r}: expected cpu, cuda or cuda:N (N a GPU index, e.g. cuda:0)")
    return value


Device = Annotated[str, AfterValidator(parse_device)]


def resolve_device(value: str) -> torch.device:
    """The torch device for a checked device string, if this machine has it."""
    device = torch.device(parse_device(value))
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise SpecdecError(
            f"device {value!r} needs a CUDA GPU, but {why} (torch {torch.__version__}); "
            "use device: cpu, or install a CUDA build of PyTorch (docs/gpu.md)"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise SpecdecError(f"device {value!r} does not exist: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device
