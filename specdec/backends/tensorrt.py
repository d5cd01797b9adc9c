"""TensorRT backend: a serialized engine built from a specdec ONNX export (specdec export --format
tensorrt), run on torch CUDA tensors bound zero-copy. Everything but the execute call is shared with
the onnxruntime backend (specdec/backends/onnx_contract.py).

The engine has two optimization profiles (verify, prefill: onnx_contract.profiles); each has its own
execution context, and a forward runs in the one whose profile holds its shapes. Engines are cached
beside the export under engines/, keyed by GPU, TensorRT version, ONNX hash and profiles.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from specdec.backends.base import BackendOptions
from specdec.backends.onnx_contract import OnnxContractBackend, Profile, folder_eos, profiles, read_manifest
from specdec.devices import Device, resolve_device
from specdec.errors import SpecdecError

MIN_VERSION = 10
ENGINES = "engines"


class TensorRTOptions(BackendOptions):
    device: Device = "cuda"
    max_nodes: int = 64  # largest verified tree: the verify profile's query length
    max_batch: int = Field(1, ge=1)  # most rows of a batched forward: the verify profile's batch
    max_context: int | None = None  # the profiles' largest cache (default: the model's context)
    prefill_chunk: int = 256  # prompt tokens per prefill forward: the prefill profile's query length
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # of an export made on first use
    cache_dir: str | None = None  # where exports made on first use go (default ~/.cache/specdec/onnx)


def import_tensorrt():
    """The tensorrt module (version 10 or later), or one line saying how to install it."""
    try:
        import tensorrt
    except ImportError:
        raise SpecdecError(
            "TensorRT is not installed: pip install 'specdec[tensorrt]' (from NVIDIA's index on a machine "
            "with an NVIDIA GPU; see docs/gpu.md)"
        ) from None
    if int(tensorrt.__version__.split(".")[0]) < MIN_VERSION:
        raise SpecdecError(f"TensorRT {tensorrt.__version__} is too old: specdec needs TensorRT {MIN_VERSION} or later")
    return tensorrt


def engine_profiles(manifest: dict, max_nodes: int, max_context: int | None, prefill_chunk: int,
                    max_batch: int = 1) -> list[Profile]:
    context = min(max_context or manifest["context"], manifest["context"])
    return profiles(max_nodes, context, prefill_chunk, max_batch)


def onnx_digest(folder: Path) -> str:
    """sha256 of the graph and its external weights (hashed once per process while the files stay
    unchanged: a build, its validation and the backends it loads all ask)."""
    files = sorted(Path(folder).glob("model.onnx*"))
    return _digest(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=8)
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def engine_identity(folder: Path, version: str, device: torch.device, engine_profiles: list[Profile]) -> dict:
    """What an engine is valid for: engines are bound to the GPU and TensorRT version they were built with."""
    major, minor = torch.cuda.get_device_capability(device)
    return {
        "gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}", "tensorrt": version,
        "onnx_sha256": onnx_digest(folder),
        "profiles": [{"name": p.name, "query": list(p.query), "capacity": list(p.capacity), "batch": list(p.batch)}
                     for p in engine_profiles],
    }


def engine_path(folder: Path, identity: dict) -> Path:
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / ENGINES / f"{key}.plan"


class TensorRTBackend(OnnxContractBackend):
    name = "tensorrt"
    Options = TensorRTOptions
    artifact = "tensorrt"

    def __init__(self, engine, manifest: dict, engine_profiles: list[Profile], device: torch.device, eos_token_ids=frozenset()):
        self.engine, self.profiles = engine, engine_profiles
        self.contexts = []
        stream = torch.cuda.current_stream(device).cuda_stream
        for index in range(len(engine_profiles)):
            context = engine.create_execution_context()
            context.set_optimization_profile_async(index, stream)
            self.contexts.append(context)
        super().__init__(manifest, device, eos_token_ids, prefill_chunk=engine_profiles[1].query[2])
        self.max_length = engine_profiles[0].capacity[2]
        self.max_batch = engine_profiles[0].batch[2]

    @classmethod
    def load(cls, model: str, options: TensorRTOptions) -> TensorRTBackend:
        trt = import_tensorrt()
        device = resolve_device(options.device)
        if device.type != "cuda":
            raise SpecdecError(f"the tensorrt backend runs on a CUDA GPU; got device {options.device!r}")
        folder = Path(model).expanduser()
        manifest = read_manifest(folder)
        chosen = engine_profiles(manifest, options.max_nodes, options.max_context, options.prefill_chunk, options.max_batch)
        path = engine_path(folder, engine_identity(folder, trt.__version__, device, chosen))
        if not path.is_file():
            raise SpecdecError(f"{folder} has no TensorRT engine for this GPU, TensorRT {trt.__version__} and these "
                               f"profiles; build one: specdec export {folder} --format tensorrt --out DIR")
        with torch.cuda.device(device):
            engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise SpecdecError(f"TensorRT could not load {path}; delete it to rebuild")
        backend = cls(engine, manifest, chosen, device, folder_eos(folder))
        backend.folder = folder
        return backend

    def execute(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        (batch, query), capacity = inputs[0].shape, inputs[3].shape[2]
        index = next((i for i, p in enumerate(self.profiles) if p.holds(query, capacity, batch)), None)
        if index is None:
            bounds = "; ".join(f"{p.name}: query {p.query[0]}..{p.query[2]}, cache {p.capacity[0]}..{p.capacity[2]}, "
                               f"batch {p.batch[0]}..{p.batch[2]}" for p in self.profiles)
            raise SpecdecError(f"a forward of {batch} x {query} tokens over a {capacity}-slot cache is outside the "
                               f"engine's profiles ({bounds}); rebuild it with a larger --max-nodes, --max-context "
                               "or --max-batch")
        context = self.contexts[index]
        names = self.manifest["inputs"], self.manifest["outputs"]
        for name, tensor in zip(names[0], inputs):
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in zip(names[1], outputs):
            context.set_tensor_address(name, tensor.data_ptr())
        # On the current torch stream: ordered with the surrounding torch ops, no synchronisation.
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT failed to run a forward of {query} tokens over {capacity} slots")
