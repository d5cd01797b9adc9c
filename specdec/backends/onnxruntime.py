"""ONNX Runtime backend: runs a specdec ONNX export through I/O binding (bookkeeping shared with
every ONNX-contract backend: specdec/backends/onnx_contract.py).

Inputs and outputs are bound to the torch tensors' memory, so on the CUDA execution provider the
cache never leaves the GPU. CPU and CUDA share this one path. `providers` also takes ONNX Runtime's
TensorRT execution provider (a second route to TensorRT), whose shape profiles are filled in from
the same profiles as the tensorrt backend's engines.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from specdec.backends.base import BackendOptions
from specdec.backends.onnx_contract import OnnxContractBackend, folder_eos, profiles, read_manifest
from specdec.devices import Device, resolve_device
from specdec.errors import SpecdecError

NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_}
TENSORRT_EP = "TensorrtExecutionProvider"

Provider = str | tuple[str, dict[str, Any]]


class OnnxRuntimeOptions(BackendOptions):
    device: Device = "cpu"  # cpu, cuda, cuda:N
    # default: CUDAExecutionProvider on cuda, else CPUExecutionProvider. An entry is a name or
    # [name, {option: value}]; TensorrtExecutionProvider gets its trt_profile_* shapes filled in.
    providers: list[Provider] | None = None
    intra_op_threads: int = 0  # 0 = onnxruntime's choice
    inter_op_threads: int = 1
    # threads spin between a forward's operators instead of sleeping, and stop when it returns (so
    # that a PyTorch draft run between forwards has the cores)
    allow_spinning: bool = True
    prefill_chunk: int = 256  # prompt tokens per prefill forward
    max_nodes: int = 64  # largest verified tree (TensorRT execution provider profiles only)
    dtype: Literal["float32", "float16"] = "float32"  # of an export made on first use
    # of an export made on first use: "auto" keeps a .gguf file's quantized weights quantized
    # (MatMulNBits), "float" dequantizes them, "int4" / "int8" quantize float weights (docs/export.md);
    # activations "int8" is faster and changes the numbers
    weights: Literal["auto", "float", "int4", "int8"] = "auto"
    activations: Literal["float32", "int8"] = "float32"
    cache_dir: str | None = None  # where exports made on first use go (default ~/.cache/specdec/onnx)


def create_session(
    folder: Path, providers: list[Provider], intra_op_threads: int, inter_op_threads: int = 1, allow_spinning: bool = True,
    profile_prefix: str | None = None,
):
    try:
        import onnxruntime as ort
    except ImportError:
        raise SpecdecError("the onnxruntime backend needs onnxruntime: pip install 'specdec[onnx]'") from None
    names = [p if isinstance(p, str) else p[0] for p in providers]
    missing = [p for p in names if p not in ort.get_available_providers()]
    if missing:
        hint = " (pip install 'specdec[onnx-gpu]': onnxruntime-gpu, with onnxruntime uninstalled)" if set(missing) & {"CUDAExecutionProvider", TENSORRT_EP} else ""
        raise SpecdecError(f"onnxruntime has no {', '.join(missing)}{hint}; available: {', '.join(ort.get_available_providers())}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    for scope in ("intra_op", "inter_op"):
        options.add_session_config_entry(f"session.{scope}.allow_spinning", "1" if allow_spinning else "0")
    # onnxruntime's threads otherwise spin on after a run returns, taking the cores from whatever
    # runs next (a chain's PyTorch draft: 29.2 -> 19.9 tok/s, BENCHMARKS.md)
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(folder / "model.onnx"), sess_options=options, providers=providers)


def tensorrt_provider_options(manifest: dict, max_nodes: int, prefill_chunk: int, given: dict[str, Any]) -> dict[str, Any]:
    """The TensorRT execution provider's trt_profile_{min,opt,max}_shapes for our profiles (one
    entry per input and profile, "name:1x1x16x528"), unless the user gave them."""
    options = dict(given)
    if any(key.startswith("trt_profile_") for key in options):
        return options
    sets = [profile.shapes(manifest) for profile in profiles(max_nodes, manifest["context"], prefill_chunk)]
    for index, which in enumerate(("min", "opt", "max")):
        options[f"trt_profile_{which}_shapes"] = ",".join(
            f"{name}:{'x'.join(map(str, shapes[name][index]))}" for shapes in sets for name in manifest["inputs"]
        )
    return options


class OnnxRuntimeBackend(OnnxContractBackend):
    name = "onnxruntime"
    Options = OnnxRuntimeOptions
    artifact = "onnx"

    def __init__(self, session, manifest: dict, device: torch.device, eos_token_ids=frozenset(), prefill_chunk: int = 256):
        super().__init__(manifest, device, eos_token_ids, prefill_chunk)
        self.session = session
        self.source = None  # (folder, session settings) once loaded: op_profile opens a profiling session

    @classmethod
    def load(cls, model: str, options: OnnxRuntimeOptions) -> OnnxRuntimeBackend:
        folder = Path(model).expanduser()
        manifest = read_manifest(folder)
        device = resolve_device(options.device)
        providers = options.providers or (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        )
        entries = [(p, {}) if isinstance(p, str) else p for p in providers]  # (name, options)
        providers = [
            (name, tensorrt_provider_options(manifest, options.max_nodes, options.prefill_chunk, given) if name == TENSORRT_EP else given)
            for name, given in entries
        ]
        settings = (providers, options.intra_op_threads, options.inter_op_threads, options.allow_spinning)
        backend = cls(create_session(folder, *settings), manifest, device, folder_eos(folder), options.prefill_chunk)
        backend.source, backend.folder = (folder, settings), folder
        return backend

    def op_profile(self, run) -> dict[str, float] | None:
        """ONNX Runtime's own profiler, on a second session over the same graph."""
        if self.source is None:
            run()
            return None
        folder, settings = self.source
        with tempfile.TemporaryDirectory() as tmp:
            session, self.session = self.session, create_session(folder, *settings, profile_prefix=f"{tmp}/ort")
            try:
                run()
                events = json.loads(Path(self.session.end_profiling()).read_text())
            finally:
                self.session = session
        seconds: dict[str, float] = {}
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                op = event["args"]["op_name"]
                seconds[op] = seconds.get(op, 0.0) + event["dur"] / 1e6
        return seconds

    def execute(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        binding = self.session.io_binding()
        names = self.manifest["inputs"], self.manifest["outputs"]
        for name, tensor in zip(names[0], inputs):
            _bind(binding.bind_input, name, tensor)
        for name, tensor in zip(names[1], outputs):
            _bind(binding.bind_output, name, tensor)
        if self.device.type == "cuda":  # ONNX Runtime runs on its own stream: inputs made on torch's must be ready
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)  # returns once the outputs are written; the caller keeps
        # every bound tensor alive until here


def _bind(bind, name: str, tensor: torch.Tensor) -> None:
    """Bind `tensor`'s memory to an input or output of the session."""
    bind(name, tensor.device.type, tensor.device.index or 0, NUMPY_DTYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
