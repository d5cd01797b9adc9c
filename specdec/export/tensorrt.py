"""`specdec export --format tensorrt`: a serialized TensorRT engine built from the project's own ONNX
export, strongly typed (the precision is the ONNX graph's), with the verify and prefill profiles of
specdec/backends/onnx_contract.py; and `--validate`: logits against PyTorch at shapes the build
never used (the profile corners included), then greedy speculative decoding on the engine.

Only this module and TensorRTBackend.execute touch TensorRT; everything else is shared with the
onnxruntime backend and tested on CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from specdec.backends.onnx_contract import read_manifest
from specdec.backends.tensorrt import engine_identity, engine_path, engine_profiles, import_tensorrt
from specdec.devices import resolve_device
from specdec.errors import SpecdecError

logger = logging.getLogger(__name__)
WORKSPACE = 8 << 30  # bytes of scratch the builder may use


def export_tensorrt(model: str, out: Path, dtype: str, opset: int | None, max_nodes: int, max_context: int | None,
                    prefill_chunk: int, validate: bool, report: Callable[[str], None] = print, max_batch: int = 1) -> Path:
    """ONNX export and engine build into OUT.partial, validated there (lines go to `report`), then
    renamed to `out`: nothing is left behind when any step fails. -> the engine's path in `out`."""
    from specdec.export.onnx import check_summary, export_onnx, worst_case

    import_tensorrt()
    resolve_device("cuda")
    if out.exists() and any(out.iterdir()):
        raise SpecdecError(f"output folder {str(out)!r} is not empty; remove it or choose another --out")
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    try:
        export_onnx(model, work, dtype, opset, weights="float")  # TensorRT has no MatMulNBits
        engine = build_engine(work, max_nodes, max_context, prefill_chunk, max_batch=max_batch)
        if validate:
            result = validate_engine(work, model, max_nodes, max_context, prefill_chunk, max_batch)
            report(check_summary(result))
            report(f"greedy speculative decoding on the engine: {'identical' if result['greedy_identical'] else 'DIFFERS'}")
            if max_batch > 1:
                report(f"greedy batched decoding on the engine: {'identical' if result['batch_identical'] else 'DIFFERS'}")
            if not result["ok"]:
                raise SpecdecError(f"the engine does not match PyTorch ({worst_case(result)}); nothing was written")
        shutil.rmtree(out, ignore_errors=True)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out / engine.relative_to(work)


def build_engine(folder: Path, max_nodes: int = 64, max_context: int | None = None, prefill_chunk: int = 256,
                 device: str = "cuda", max_batch: int = 1) -> Path:
    """The engine for this GPU in `folder`/engines (built unless cached); written atomically."""
    trt = import_tensorrt()
    cuda = resolve_device(device)
    manifest = read_manifest(folder)
    chosen = engine_profiles(manifest, max_nodes, max_context, prefill_chunk, max_batch)
    identity = engine_identity(folder, trt.__version__, cuda, chosen)
    path = engine_path(folder, identity)
    if path.is_file():
        return path
    logger.warning("building a TensorRT engine for %s in %s (minutes; later runs reuse it)", folder, path)
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(Path(folder) / "model.onnx")):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SpecdecError(f"TensorRT cannot parse {folder}/model.onnx: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE)
    for profile in chosen:
        optimization = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes(manifest).items():
            optimization.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimization)
    with torch.cuda.device(cuda):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SpecdecError(f"TensorRT could not build an engine for {folder} (see the TensorRT messages above)")
    path.parent.mkdir(exist_ok=True)
    _write_atomically(path, bytes(plan))
    _write_atomically(path.with_suffix(".json"), (json.dumps(identity, indent=2) + "\n").encode())
    return path


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def validation_cases(max_nodes: int, context: int, prefill_chunk: int) -> list[tuple[int, int, int]]:
    """(query, past, unused slots) of the logit checks: the verify and prefill profiles' corners
    (a cache of 1 slot, a full context) and sizes between, none of them an opt shape."""
    return [
        (1, 1, 0), (max_nodes, 1, 0), (1, context - 1, 0), (max_nodes, context - max_nodes, 0),
        (7, 123, 3), (max_nodes - 1, 300, 5), (prefill_chunk, 1, 0), (prefill_chunk - 1, 2 * prefill_chunk + 1, 2),
    ]


def validate_engine(folder: Path, model: str | None, max_nodes: int, max_context: int | None, prefill_chunk: int,
                    max_batch: int = 1) -> dict:
    """check_export through the engine at validation_cases, then greedy speculative decoding (dyspec,
    draft and target both the engine) against the engine's own greedy decoding; with `max_batch`
    above 1, also greedy batched decoding of prompts of different lengths against each alone."""
    from specdec.backends.tensorrt import TensorRTBackend, TensorRTOptions
    from specdec.config import GenerationOptions
    from specdec.decoder import SpeculativeDecoder
    from specdec.export.onnx import check_export
    from specdec.plugins import get_strategy

    options = TensorRTOptions(max_nodes=max_nodes, max_context=max_context, prefill_chunk=prefill_chunk, max_batch=max_batch)
    engine = TensorRTBackend.load(str(folder), options)
    cases = validation_cases(max_nodes, engine.max_length, engine.prefill_chunk)
    result = check_export(folder, model, cases, backend=engine)
    prompt = list(range(3, 3 + 2 * engine.prefill_chunk + 5))  # crosses the prefill chunks
    settings = GenerationOptions(max_new_tokens=48, ignore_eos=True)
    reference = SpeculativeDecoder(engine, None, _strategy(get_strategy, "ar", {}), settings).generate(prompt).token_ids
    draft = TensorRTBackend.load(str(folder), options)
    dyspec = _strategy(get_strategy, "dyspec", {"max_nodes": min(16, max_nodes)})
    speculative = SpeculativeDecoder(engine, draft, dyspec, settings).generate(prompt).token_ids
    result["greedy_identical"] = speculative == reference
    result["ok"] = result["ok"] and result["greedy_identical"]
    if max_batch > 1:
        ar = SpeculativeDecoder(engine, None, _strategy(get_strategy, "ar", {}), settings)
        prompts = [prompt[: 5 + 7 * i] for i in range(max_batch)]
        batched = [out.token_ids for out in ar.generate_batch(prompts, batch_size=max_batch)]
        result["batch_identical"] = batched == [ar.generate(p).token_ids for p in prompts]
        result["ok"] = result["ok"] and result["batch_identical"]
    return result


def _strategy(get_strategy, name: str, options: dict):
    component = get_strategy(name)
    return component.cls(component.cls.Options(**options))
