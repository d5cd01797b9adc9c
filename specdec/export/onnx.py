"""`specdec export --format onnx`: a self-contained folder (graph, manifest, config, tokenizer), and
`--check`: the exported graph against PyTorch on random trees at unseen sizes."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import torch

from specdec import __version__
from specdec.backends.onnx_contract import FORMAT, FORMAT_VERSION, MANIFEST, read_manifest
from specdec.errors import SpecdecError
from specdec.export.onnx_graph import KVShape, TreeMaskGraph, dynamic_shapes, example_inputs, input_names, output_names
from specdec.export.rewrite import fuse_sibling_matmuls, load_graph, save_graph
from specdec.models import context_limit, load_error, load_tokenizer, resolve_source

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Float reordering noise grows with depth and logit scale: the logit error is judged relative to
# the largest |logit|, next to the probabilities' error and the greedy choices.
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
PROB_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}


def export_onnx(model: str, out: Path, dtype: str = "float32", opset: int | None = None,
                feature_layers: tuple[int, ...] | None = None, weights: str = "auto", activations: str = "float32") -> Path:
    """Export `model` (a local folder, hub id or .gguf file) into `out`, written whole or not at all.
    The graph also returns the hidden states entering `feature_layers` (default: EAGLE-3's, 2, N//2,
    N-3, for N >= 3 layers; () for none), which an EAGLE-3 draft reads. `weights` (specdec.export.nbits):
    "auto" keeps a GGUF's quantized weights quantized (else float), "float" dequantizes everything,
    "int4" / "int8" quantize the float weights per block (the target becomes that quantized model);
    quantized products run with float32 or int8 `activations`."""
    gguf = str(model).endswith(".gguf")
    quantize = weights in ("int4", "int8") or weights == "auto" and gguf
    if activations != "float32" and not quantize:
        raise SpecdecError("--activations int8 applies to quantized weights: a .gguf model with --weights auto, or --weights int4 / int8")
    if weights == "int8" and activations != "int8":
        raise SpecdecError("--weights int8 needs --activations int8: onnxruntime has a fast 8-bit kernel only for int8 "
                           "activations (with float32 ones it dequantizes every weight in every forward); or use --weights int4")
    if quantize and dtype != "float32":
        raise SpecdecError(f"quantized weights are kept in float32 exports only; use --dtype float32, or --weights float "
                           f"for a {dtype} export")
    from specdec.eagle3 import default_aux_layers
    from specdec.hf_compat import check_architecture

    try:
        import onnx  # noqa: F401  (the exporter needs onnx and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError:
        raise SpecdecError("exporting to ONNX needs onnx and onnxscript: pip install 'specdec[onnx]'") from None
    if out.exists() and any(out.iterdir()):
        raise SpecdecError(f"output folder {str(out)!r} is not empty; remove it or choose another --out")
    from tqdm import tqdm

    from specdec.backends.vocab import VOCAB_FILE

    phases = tqdm(total=3, desc=f"export {Path(model).name}: load", file=sys.stderr, bar_format="{desc} [{n}/{total}, {elapsed}]")
    hf = _load(model, dtype)
    check_architecture(hf)
    shape = KVShape.of(hf.config)
    if feature_layers is None:  # EAGLE-3's defaults exist from 3 layers up
        feature_layers = default_aux_layers(shape.layers) if shape.layers >= 3 else ()
    graph = TreeMaskGraph(hf, tuple(feature_layers))  # checks the layers exist
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    phases.update()
    phases.set_description(f"export {Path(model).name}: trace and convert (up to minutes for a real model)")
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                graph.eval(), example_inputs(shape, hf.config.get_text_config().vocab_size, hf.dtype),
                dynamic_shapes=dynamic_shapes(shape.layers), dynamo=True, opset_version=opset,
                input_names=input_names(shape.layers), output_names=output_names(shape.layers, bool(feature_layers)),
            )
        phases.update()
        phases.set_description(f"export {Path(model).name}: save")
        large = sum(p.numel() * p.element_size() for p in hf.parameters()) > 1 << 30
        program.save(str(partial / "model.onnx"), external_data=large)
        graph, external = load_graph(partial / "model.onnx")
        weight_summary = {"kind": "float"}
        if quantize:
            phases.set_description(f"export {Path(model).name}: quantized weights ({weights})")
            weight_summary = _quantize_weights(graph, model, weights, activations)
        fused = fuse_sibling_matmuls(graph)
        if quantize or fused:
            save_graph(graph, partial / "model.onnx", external)
        vocab_map = Path(resolve_source(model, dtype)) / VOCAB_FILE
        if vocab_map.is_file():  # a reduced-vocabulary draft: the map travels with the graph
            shutil.copy(vocab_map, partial / VOCAB_FILE)
        hf.config.save_pretrained(partial)
        if hf.generation_config is not None:
            hf.generation_config.save_pretrained(partial)
        tokenizer = load_tokenizer(model)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        (partial / MANIFEST).write_text(json.dumps(_manifest(model, hf, shape, dtype, program, feature_layers, weight_summary, fused), indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
        phases.update()
    finally:
        phases.close()
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _quantize_weights(graph, model: str, weights: str, activations: str) -> dict:
    """The MatMul weights of `graph` (a loaded ModelProto) as MatMulNBits blocks: a GGUF file's own ("auto"), or rounded to
    nearest from the float weights ("int4", "int8") -> the manifest's `weights` entry."""
    from specdec.export.nbits import BLOCK, quantize_graph, round_to_nearest

    if weights == "auto":
        from specdec.export.gguf_weights import FLOAT_TYPES, GgufWeights

        source = GgufWeights(Path(model).expanduser()).find
        return {"kind": "gguf", **quantize_graph(graph, source, activations, floats=FLOAT_TYPES)}
    bits = int(weights[3:])

    def source(weight_t):
        return ("", round_to_nearest(weight_t, bits), weights) if weight_t.shape[1] % BLOCK == 0 else None

    return {"kind": weights, **quantize_graph(graph, source, activations)}


def _load(model: str, dtype: str):
    from transformers import AutoModelForCausalLM

    source = resolve_source(model, dtype)
    for attention in ("sdpa", "eager"):  # some architectures have no SDPA path
        try:
            return AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], attn_implementation=attention).eval()
        except ValueError as exc:
            error = exc
        except Exception as exc:
            raise load_error(model, exc) from exc
    raise load_error(model, error)


def _manifest(model: str, hf, shape: KVShape, dtype: str, program, feature_layers: tuple[int, ...], weights: dict,
              fused: int) -> dict:
    import onnx
    import transformers

    config = hf.config.get_text_config()
    opset = next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "source_model": str(model),
        "architecture": config.model_type, "layers": shape.layers, "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim, "vocab_size": config.vocab_size, "context": context_limit(config),
        "dtype": dtype, "opset": opset, "inputs": input_names(shape.layers),
        "outputs": output_names(shape.layers, bool(feature_layers)),
        "feature_layers": list(feature_layers), "hidden_size": config.hidden_size, "weights": weights,
        "fused_matmuls": fused,
        "versions": {"specdec": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "onnx": onnx.__version__},
    }


def check_export(folder: Path, model: str | None = None, cases=((1, 7, 3), (6, 11, 3), (9, 0, 3), (4, 33, 3)),
                 backend=None) -> dict:
    """Run random trees of (query, past, unused slots) sizes the export never saw through the graph
    (on `backend`, an ONNX-contract backend over `folder`; default onnxruntime on the CPU) and
    through PyTorch -> {"max_abs_diff", "relative_diff", "max_prob_diff", "greedy_agree", "tolerance",
    "prob_tolerance", "ok", "cases", "worst"}. Greedy choices must agree wherever the top two logits
    are further apart than the measured error (closer ones are ties within float noise)."""
    from specdec.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeOptions

    manifest = read_manifest(folder)
    if backend is None:
        backend = OnnxRuntimeBackend.load(str(folder), OnnxRuntimeOptions())
    hf = _load(model or manifest["source_model"], manifest["dtype"]).to(backend.device)
    shape, gen = KVShape.of(hf.config), torch.Generator().manual_seed(0)
    worst = relative = prob_worst = 0.0
    agree, rows = True, []
    for query, past, unused in cases:
        ids, positions, mask, kv = _random_tree(shape, manifest["vocab_size"], hf.dtype, query, past, unused, gen)
        logits = graph_logits(backend, ids, positions, mask, kv)
        expected = _reference(hf, ids, positions, mask, kv, unused)
        diff = float((logits - expected).abs().max())
        prob_diff = float((logits.softmax(-1) - expected.softmax(-1)).abs().max())
        top2 = expected.topk(2, dim=-1).values
        decided = (top2[..., 0] - top2[..., 1]) > 2 * diff
        same = bool((logits.argmax(-1) == expected.argmax(-1))[decided].all())
        worst, prob_worst, agree = max(worst, diff), max(prob_worst, prob_diff), agree and same
        case_relative = diff / max(float(expected.abs().max()), 1e-6)
        relative = max(relative, case_relative)
        rows.append({"query": query, "past": past, "max_abs_diff": diff, "relative_diff": case_relative,
                     "max_prob_diff": prob_diff, "greedy_agree": same})
    tolerance, prob_tolerance = RELATIVE_TOLERANCE[manifest["dtype"]], PROB_TOLERANCE[manifest["dtype"]]
    ok = relative <= tolerance and prob_worst <= prob_tolerance and agree
    failing = [r for r in rows if r["relative_diff"] > tolerance or r["max_prob_diff"] > prob_tolerance or not r["greedy_agree"]]
    return {"max_abs_diff": worst, "relative_diff": relative, "max_prob_diff": prob_worst, "greedy_agree": agree,
            "tolerance": tolerance, "prob_tolerance": prob_tolerance, "ok": ok, "cases": rows,
            "worst": max(failing or rows, key=lambda r: r["relative_diff"] / max(tolerance, 1e-12) + r["max_prob_diff"] / max(prob_tolerance, 1e-12))}


def check_summary(result: dict) -> str:
    """One line on a check_export result: the differences, the tolerances and the sizes tried."""
    sizes = ", ".join(f"{c['query']}/{c['past']}" for c in result["cases"])
    return (
        f"max |logit diff| {result['max_abs_diff']:.2e}, {result['relative_diff']:.1e} of the largest logit "
        f"(tolerance {result['tolerance']:.0e}); max |prob diff| {result['max_prob_diff']:.1e} (tolerance "
        f"{result['prob_tolerance']:.0e}); greedy choices agree: {'yes' if result['greedy_agree'] else 'NO'}; "
        f"{len(result['cases'])} random trees (query/past {sizes})"
    )


def worst_case(result: dict) -> str:
    """Where a check_export result is worst, and by how much."""
    worst = result["worst"]
    return (f"worst at query {worst['query']}, past {worst['past']}: logit diff {worst['relative_diff']:.1e} of the largest "
            f"logit (tolerance {result['tolerance']:.0e}), prob diff {worst['max_prob_diff']:.1e} (tolerance "
            f"{result['prob_tolerance']:.0e}), greedy choices {'agree' if worst['greedy_agree'] else 'differ'}")


def graph_logits(backend, ids, positions, mask, kv) -> torch.Tensor:
    """The graph's logits [1, Q, V] (float32, on the CPU) for raw contract inputs, run by an
    ONNX-contract backend's `execute`."""
    outputs = backend.output_buffers(ids.shape[1])
    backend.execute(backend.graph_inputs(ids, positions, mask, [t.to(backend.device).contiguous() for t in kv]), outputs)
    return outputs[0].float().cpu()


def _random_tree(shape: KVShape, vocab: int, dtype, query: int, past: int, unused: int, gen):
    """A random draft tree of `query` nodes over `past` entries, in a buffer with `unused` more
    slots of random values that the mask hides: inputs of the graph, and the unused count."""
    parents = [-1] + [int(torch.randint(0, i, (), generator=gen)) for i in range(1, query)]
    depths = [0] * query
    capacity = past + unused
    mask = torch.zeros(1, 1, query, capacity + query, dtype=torch.bool)
    mask[..., :past] = True
    for node, parent in enumerate(parents):
        depths[node] = depths[parent] + 1 if parent >= 0 else 0
        mask[0, 0, node, capacity:] = mask[0, 0, parent, capacity:] if parent >= 0 else False
        mask[0, 0, node, capacity + node] = True
    ids = torch.randint(0, vocab, (1, query), generator=gen)
    positions = (past + torch.tensor(depths))[None]
    kv = [torch.randn(1, shape.kv_heads, capacity, shape.head_dim, generator=gen).to(dtype) for _ in range(2 * shape.layers)]
    return ids, positions, mask, kv


@torch.no_grad()
def _reference(hf, ids, positions, mask, kv, unused: int) -> torch.Tensor:
    """The stock model's logits (float32, on the CPU) for the same tree: its own attention over the
    used slots only."""
    from transformers import DynamicCache

    from specdec.hf_compat import cache_argument

    ids, positions, mask, kv = (t.to(hf.device) if isinstance(t, torch.Tensor) else [x.to(hf.device) for x in t]
                                for t in (ids, positions, mask, kv))

    past = kv[0].shape[2] - unused
    cache = DynamicCache(
        ddp_cache_data=[(kv[i][:, :, :past], kv[i + 1][:, :, :past]) for i in range(0, len(kv), 2)], config=hf.config
    )
    visible = torch.cat([mask[..., :past], mask[..., past + unused :]], dim=-1)
    additive = torch.zeros(visible.shape, dtype=hf.dtype, device=hf.device).masked_fill_(~visible, torch.finfo(hf.dtype).min)
    out = hf(input_ids=ids, position_ids=positions, attention_mask=additive, use_cache=True, **{cache_argument(hf): cache})
    return out.logits.float().cpu()
