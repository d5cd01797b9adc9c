"""ONNX Runtime backend: runs a specdec ONNX export (DESIGN.md section 5) through I/O binding.

The KV cache lives in torch tensors on the model's device; inputs and outputs are bound to their
memory, so on the CUDA execution provider the cache never leaves the GPU. CPU and CUDA share this
one path. Given a Hugging Face model instead of an export, it exports on first use into a cache
folder and says so.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from specdec.backends.base import Backend, BackendOptions
from specdec.errors import SpecdecError
from specdec.export.onnx import FORMAT_VERSION, MANIFEST, export_onnx, read_manifest
from specdec.models import cache_root, source_key

logger = logging.getLogger(__name__)

NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_}


CAPACITY_STEP = 256


class OnnxRuntimeOptions(BackendOptions):
    device: str = "cpu"  # cpu, cuda, cuda:N
    providers: list[str] | None = None  # default: CUDAExecutionProvider on cuda, else CPUExecutionProvider
    intra_op_threads: int = 0  # 0 = onnxruntime's choice
    inter_op_threads: int = 1
    allow_spinning: bool = False  # idle threads spin: lower latency alone, slows a PyTorch model beside it
    dtype: Literal["float32", "float16"] = "float32"  # of an export made on first use
    cache_dir: str | None = None  # where exports made on first use go (default ~/.cache/specdec/onnx)


def create_session(
    folder: Path, providers: list[str], intra_op_threads: int, inter_op_threads: int = 1, allow_spinning: bool = False,
    profile_prefix: str | None = None,
):
    try:
        import onnxruntime as ort
    except ImportError:
        raise SpecdecError("the onnxruntime backend needs onnxruntime: pip install 'specdec[onnx]'") from None
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        hint = " (pip install 'specdec[onnx-gpu]': onnxruntime-gpu, with onnxruntime uninstalled)" if "CUDAExecutionProvider" in missing else ""
        raise SpecdecError(f"onnxruntime has no {', '.join(missing)}{hint}; available: {', '.join(ort.get_available_providers())}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    for scope in ("intra_op", "inter_op"):
        options.add_session_config_entry(f"session.{scope}.allow_spinning", "1" if allow_spinning else "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(folder / "model.onnx"), sess_options=options, providers=providers)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    Options = OnnxRuntimeOptions

    def __init__(self, session, manifest: dict, device: torch.device, eos_token_ids=frozenset()):
        self.session = session
        self.manifest = manifest
        self.vocab_size = manifest["vocab_size"]
        self.max_length = manifest["context"]
        self.device = device
        self.dtype = torch.float16 if manifest["dtype"] == "float16" else torch.float32
        self.eos_token_ids = frozenset(eos_token_ids)
        self.forward_calls, self.forward_seconds = 0, 0.0
        self._names = manifest["inputs"], manifest["outputs"]
        self.source = None  # (folder, session settings) once loaded: op_profile opens a profiling session
        self.reset()

    @classmethod
    def load(cls, model: str, options: OnnxRuntimeOptions) -> OnnxRuntimeBackend:
        folder = Path(model).expanduser()
        if not (folder / MANIFEST).is_file():
            if folder.is_dir() and not (folder / "config.json").is_file():
                read_manifest(folder)  # neither an export nor a model: say so
            folder = _export_on_first_use(model, options)
        manifest = read_manifest(folder)
        device = torch.device(options.device)
        providers = options.providers or (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        )
        settings = (providers, options.intra_op_threads, options.inter_op_threads, options.allow_spinning)
        backend = cls(create_session(folder, *settings), manifest, device, _eos(folder))
        backend.source = folder, settings
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

    def reset(self) -> None:
        layers, heads, dim = self.manifest["layers"], self.manifest["kv_heads"], self.manifest["head_dim"]
        # [1, H_kv, capacity, D] per layer and key/value; zeros: unused slots must hold finite values
        self.kv = [torch.zeros(1, heads, 0, dim, dtype=self.dtype, device=self.device) for _ in range(2 * layers)]
        self._committed, self._pending = 0, 0

    def _reserve(self, needed: int) -> None:
        """Grow the buffers to hold `needed` entries, in steps of CAPACITY_STEP slots: the graph
        attends over every slot (masked ones cost a little), and growing copies the cache."""
        capacity = self.kv[0].shape[2]
        if needed <= capacity:
            return
        capacity = -(-needed // CAPACITY_STEP) * CAPACITY_STEP
        used = self._committed + self._pending
        for i, old in enumerate(self.kv):
            new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
            new[:, :, :used] = old[:, :, :used]
            self.kv[i] = new

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._pending:
            raise RuntimeError("prefill with pending entries; commit or rollback first")
        length = input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril_()[None]
        logits = self.forward(input_ids, torch.arange(self._committed, self._committed + length)[None], causal)
        self.commit(list(range(length)))
        return logits[:, -1]

    def forward(self, input_ids, position_ids, mask) -> torch.Tensor:
        start = time.perf_counter()
        query, used = input_ids.shape[1], self._committed + self._pending
        self._reserve(used + query)
        # An empty cache (a prefill) is passed as capacity 0: attention then skips the unused slots.
        past = self.kv if used else [t[:, :, :0] for t in self.kv]
        capacity = past[0].shape[2]
        full = torch.zeros(1, 1, query, capacity + query, dtype=torch.bool)  # [1, 1, Q, C + Q]
        full[0, 0, :, : self._committed] = True
        full[0, 0, :, self._committed : used] = mask[0, :, : self._pending]
        full[0, 0, :, capacity:] = mask[0, :, self._pending :]
        inputs = [input_ids.long(), position_ids.long(), full] + past
        logits = torch.empty(1, query, self.vocab_size, dtype=self.dtype, device=self.device)
        presents = [torch.empty(1, t.shape[1], query, t.shape[3], dtype=self.dtype, device=self.device) for t in self.kv]
        binding = self.session.io_binding()
        bound = [_bind(binding.bind_input, n, t.to(self.device).contiguous()) for n, t in zip(self._names[0], inputs)]
        bound += [_bind(binding.bind_output, n, t) for n, t in zip(self._names[1], [logits] + presents)]
        self.session.run_with_iobinding(binding)  # `bound` keeps every bound buffer alive until here
        for buffer, new in zip(self.kv, presents):
            buffer[:, :, used : used + query] = new
        self._pending += query
        self.forward_calls += 1
        self.forward_seconds += time.perf_counter() - start
        return logits.float()

    def commit(self, keep: list[int]) -> None:
        if keep != list(range(len(keep))):  # a prefix of pending is already in place
            index = torch.tensor(keep, dtype=torch.long, device=self.device) + self._committed
            end = self._committed + len(keep)
            for buffer in self.kv:
                buffer[:, :, self._committed : end] = buffer.index_select(2, index)
        self._committed += len(keep)
        self._pending = 0


def _bind(bind, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Bind `tensor`'s memory to an input or output of the session; returns what must stay alive."""
    if tensor.numel() == 0:  # an empty past (the first forward) still needs a valid address
        tensor = torch.empty(1, dtype=tensor.dtype, device=tensor.device)[:0].reshape(tensor.shape)
    device_id = tensor.device.index or 0
    bind(name, tensor.device.type, device_id, NUMPY_DTYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
    return tensor


def _eos(folder: Path) -> frozenset[int]:
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return frozenset([eos] if isinstance(eos, int) else eos)
    return frozenset()


def _export_on_first_use(model: str, options: OnnxRuntimeOptions) -> Path:
    root = Path(options.cache_dir).expanduser() if options.cache_dir else cache_root() / "onnx"
    source = str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model
    folder = root / f"{Path(source).name}-{source_key(source)}-{options.dtype}-v{FORMAT_VERSION}"
    if not (folder / MANIFEST).is_file():
        logger.warning("exporting %s to ONNX in %s (first use; later runs reuse it)", model, folder)
        export_onnx(source, folder, options.dtype)
    return folder
