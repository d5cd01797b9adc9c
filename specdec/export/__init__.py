"""Export of models to deployable graphs (ONNX; TensorRT engines are built from the ONNX graph).

`prepare` turns a model into what a backend's `load` takes (its `artifact`), on first use, into a
cache folder: the export layer uses backends, never the reverse.
"""

from __future__ import annotations

import logging
from pathlib import Path

from specdec.backends.base import Backend, BackendOptions
from specdec.backends.onnx_contract import FORMAT_VERSION, MANIFEST, read_manifest
from specdec.models import cache_root, source_key

logger = logging.getLogger(__name__)


def prepare(model: str, backend: type[Backend], options: BackendOptions) -> str:
    """`model` itself for a backend that loads models; for one that runs exports, a specdec ONNX
    export of it (made on first use unless `model` is one) with, for "tensorrt", an engine for this
    GPU built on first use beside it."""
    if backend.artifact is None:
        return model
    folder = Path(model).expanduser()
    if not (folder / MANIFEST).is_file():
        if folder.is_dir() and not (folder / "config.json").is_file():
            read_manifest(folder)  # neither an export nor a model: say so
        weights = getattr(options, "weights", "float"), getattr(options, "activations", "float32")
        folder = _export_on_first_use(model, options.dtype, options.cache_dir, *weights)
    if backend.artifact == "tensorrt":
        from specdec.export.tensorrt import build_engine

        build_engine(folder, options.max_nodes, options.max_context, options.prefill_chunk, max_batch=options.max_batch)
    return str(folder)


def _export_on_first_use(model: str, dtype: str, cache_dir: str | None, weights: str = "float",
                         activations: str = "float32") -> Path:
    """weights: "auto" keeps a .gguf file's quantized weights, "int4" / "int8" quantize float ones
    (backends that run MatMulNBits); "float" for the others."""
    from specdec.export.onnx import export_onnx

    root = Path(cache_dir).expanduser() if cache_dir else cache_root() / "onnx"
    source = str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model
    if weights == "auto" and not source.endswith(".gguf"):
        weights = "float"  # nothing quantized to keep
    if weights == "float":
        activations = "float32"
    mode = "" if weights == "float" else f"-{'gguf' if weights == 'auto' else weights}-{activations}"
    folder = root / f"{Path(source).name}-{source_key(source)}-{dtype}{mode}-v{FORMAT_VERSION}"
    if not (folder / MANIFEST).is_file():
        logger.warning("exporting %s to ONNX in %s (first use; later runs reuse it)", model, folder)
        export_onnx(source, folder, dtype, weights=weights, activations=activations)
    return folder
