"""Rewrites of a saved ONNX export in place: loading and saving it (weights inline, or in one
external data file for a large model), and fusing sibling projections.

Sibling projections are MatMuls that read the same activation with constant weights: a decoder
layer's query, key and value projections, and its gate and up projections. They become one MatMul
over the weights concatenated along N, then a Split into the old outputs. Each output element is
the same dot product over K as before; on ONNX Runtime's CPU kernels the outputs are equal to the
bit (tests/test_export_rewrite.py, and tests/test_onnx.py against an unfused export). There one
[K, N1 + N2 + N3] product costs less than three, at one row and at eight (SmolLM2-135M:
docs/export.md).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def load_graph(path: Path):
    """-> (the ModelProto at `path` with every weight in memory, whether its weights were external)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if external:
        onnx.load_external_data_for_model(model, str(path.parent))
    return model, external


def save_graph(model, path: Path, external: bool) -> None:
    """Write `model` over `path`, its weights in one external file `<name>.data` if `external`
    (the old external files are removed first: onnx appends to an existing one)."""
    import onnx

    for old in path.parent.glob(f"{path.name}?*"):
        old.unlink()
    onnx.save(model, str(path), save_as_external_data=external, location=f"{path.name}.data")


def fuse_sibling_matmuls(model) -> int:
    """Fuse each group of MatMuls reading one activation with 2-D weight initializers (so of one K
    and type) into a MatMul and a Split, in place -> the number of MatMuls the graph lost."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    siblings = defaultdict(list)  # activation -> MatMul nodes
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is not None and len(weight.dims) == 2:
            siblings[node.input[0]].append(node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    replaced: dict[str, list] = {}  # first sibling's output -> its replacement nodes; the others' -> []
    for index, (activation, nodes) in enumerate((key, nodes) for key, nodes in siblings.items() if len(nodes) > 1):
        weights = [numpy_helper.to_array(initializers[node.input[1]]) for node in nodes]  # [K, N_i] each
        name = f"specdec_fused_{index}"
        graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), f"{name}.weight"))  # [K, sum N_i]
        sizes = [w.shape[1] for w in weights]
        outputs = [node.output[0] for node in nodes]
        if opset >= 13:  # Split takes its sizes as an input from opset 13
            graph.initializer.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), f"{name}.split"))
            split = helper.make_node("Split", [f"{name}.out", f"{name}.split"], outputs, name=f"{name}/Split", axis=-1)
        else:
            split = helper.make_node("Split", [f"{name}.out"], outputs, name=f"{name}/Split", axis=-1, split=sizes)
        replaced[outputs[0]] = [helper.make_node("MatMul", [activation, f"{name}.weight"], [f"{name}.out"], name=name), split]
        replaced.update({output: [] for output in outputs[1:]})
    if not replaced:
        return 0
    nodes = [new for node in graph.node for new in replaced.get(node.output[0], [node])]  # in the first sibling's place
    used = {name for node in nodes for name in node.input} | {output.name for output in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return sum(len(group) - 1 for group in siblings.values() if len(group) > 1)
