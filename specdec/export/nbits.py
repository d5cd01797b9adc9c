"""Weights as ONNX Runtime's `com.microsoft.MatMulNBits` computes them: blocks of 32 along K, each
w = (q - zero_point) * scale (+ minimum), q of 4 or 8 bits. The ONNX export rewrites each MatMul by
a weight it can express so: from a GGUF file's own blocks (specdec.export.gguf_weights, the target
stays the dequantized model) or quantized here from a float model (`--weights int4|int8`, round to
nearest per block: the target becomes that quantized model).

ONNX Runtime's fast CPU kernels (1.32, measured: docs/export.md) take only uint8 zero points, and
its 8-bit blocks have a fast kernel only with int8 activations (accuracy_level 4); otherwise it
dequantizes the whole weight in every call. A format with a per-block minimum (w = d q + m) is
therefore computed as a 4-bit product plus a small one: x . w = sum over blocks of
d (x_b . q_b) + m (sum of x_b), so W x = MatMulNBits(x) + sums(x) M^T with M the [N, K / 32]
minimums, exact up to summation order.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

BLOCK = 32
# accuracy_level of the MatMulNBits nodes: 0 lets ONNX Runtime compute in float32; 4 quantizes
# activations to int8 per block inside each product (faster, other numbers).
ACCURACY_LEVELS = {"float32": 0, "int8": 4}
NO_FAST_KERNEL = "onnxruntime has no float32-activation kernel for 8-bit blocks (--activations int8 has one)"


@dataclass
class Blocks:
    """One weight [N, K] in MatMulNBits form: q [N, K] (0 .. 2^bits - 1); per block of `block`
    weights along K ([N, K / block]) a scale, a uint8 zero point and, for formats with one, a
    minimum: w = (q - zero_point) * scale + minimum."""

    bits: int
    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    minimums: np.ndarray | None = None
    block: int = BLOCK

    def rows(self, order: np.ndarray) -> Blocks:
        pick = lambda a: None if a is None else a[order]  # noqa: E731
        return Blocks(self.bits, self.q[order], self.scales[order], self.zero_points[order], pick(self.minimums), self.block)

    def packed(self) -> np.ndarray:
        """B [N, K / block, block * bits / 8] uint8; 4 bits: weight 2i in the low nibble of byte i."""
        rows, k = self.q.shape
        q = self.q.reshape(rows, k // self.block, self.block)
        if self.bits == 8:
            return np.ascontiguousarray(q)
        return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)

    def packed_zero_points(self) -> np.ndarray:
        """Zero points packed like B (4 bits: two per byte, each row padded to whole bytes) -> [N x bytes]."""
        if self.bits == 8:
            return self.zero_points.reshape(-1)
        zp = self.zero_points
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
        return (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


def round_to_nearest(weight_t: np.ndarray, bits: int) -> Blocks:
    """W^T [N, K] quantized per block of 32 along K, rounding to nearest: 4 bits asymmetric (the
    block's range in 16 steps, a uint8 zero point), 8 bits symmetric (zero point 128)."""
    rows = weight_t.shape[0]
    w = weight_t.reshape(rows, -1, BLOCK).astype(np.float32)
    if bits == 4:
        low, high = np.minimum(w.min(-1), 0), np.maximum(w.max(-1), 0)  # the range holds 0 exactly
        scales = (high - low) / 15
        safe = np.where(scales == 0, 1, scales)
        zero_points = np.clip(np.round(-low / safe), 0, 15).astype(np.uint8)
        q = np.clip(np.round(w / safe[..., None]) + zero_points[..., None], 0, 15)
    else:
        scales = np.abs(w).max(-1) / 127
        safe = np.where(scales == 0, 1, scales)
        zero_points = np.full(scales.shape, 128, np.uint8)
        q = np.clip(np.round(w / safe[..., None]) + 128, 1, 255)
    return Blocks(bits, q.astype(np.uint8).reshape(rows, -1), scales.astype(np.float32), zero_points)


# (W^T [N, K]) -> (a name for the log, its blocks or None if they cannot be expressed, their type),
# or None to leave the weight alone
WeightSource = Callable[[np.ndarray], "tuple[str, Blocks | None, str] | None"]


def quantize_graph(model, source: WeightSource, accuracy: str = "float32", floats: tuple[str, ...] = ()) -> dict:
    """Rewrite the graph of `model` (a ModelProto with its weights loaded) in place: each MatMul whose weight `source` gives blocks
    for becomes a MatMulNBits over them; one it cannot express stays float, named in a log line
    unless its type is one of `floats`. -> a summary for the manifest: {"accuracy": ...,
    "quantized": {type: count}, "float": {type: count}}."""
    from onnx import helper

    graph = model.graph
    quantized, kept = Counter(), Counter()
    nodes, block_sums = [], {}
    initializers = {t.name: t for t in graph.initializer}
    producers = {output: n for n in graph.node for output in n.output}
    for node in graph.node:
        weight_t = _weight_t(node, initializers, producers) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight_t is None:
            nodes.append(node)
            continue
        init_name, weight_t = weight_t
        found = source(weight_t)
        if found is None:
            nodes.append(node)
            continue
        name, blocks, type_name = found
        if blocks is None or (blocks.bits == 8 and accuracy == "float32"):
            if type_name not in floats:
                why = "this export does not convert to MatMulNBits" if blocks is None else NO_FAST_KERNEL
                logger.warning("%s is %s, which %s: kept as float32 in the graph", name, type_name, why)
            kept[type_name] += 1
            nodes.append(node)
            continue
        new_nodes, new_initializers = matmul_nbits(node, init_name, blocks, ACCURACY_LEVELS[accuracy], block_sums)
        nodes += new_nodes
        graph.initializer.extend(new_initializers)
        quantized[type_name] += 1
    outputs = {o.name for o in graph.output}
    used = {name for node in nodes for name in node.input} | outputs
    nodes = [n for n in nodes if n.op_type != "Transpose" or set(n.output) & used]  # a tied weight's, now unread
    used = {name for node in nodes for name in node.input} | outputs
    keep = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"accuracy": accuracy, "quantized": dict(quantized), "float": dict(kept)}


def _weight_t(node, initializers: dict, producers: dict) -> tuple[str, np.ndarray] | None:
    """The float32 weight of MatMul `node` as W^T [N, K], with its initializer's name: an
    initializer [K, N] (a Linear's weight, transposed when exported), or the Transpose of one
    [N, K] (a weight tied to the embedding) -> None for any other second input. `initializers`:
    name -> tensor; `producers`: output name -> the node that makes it."""
    import onnx
    from onnx import numpy_helper

    name, transposed = node.input[1], True
    if name not in initializers:
        producer = producers.get(name)
        perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"), [1, 0]) if producer is not None else None
        if producer is None or producer.op_type != "Transpose" or perm != [1, 0]:
            return None
        name, transposed = producer.input[0], False
    init = initializers.get(name)
    if init is None or len(init.dims) != 2 or init.data_type != onnx.TensorProto.FLOAT:
        return None
    weight = numpy_helper.to_array(init)
    return name, weight.T if transposed else weight


def matmul_nbits(node, weight_name: str, blocks: Blocks, accuracy_level: int, block_sums: dict) -> tuple[list, list]:
    """The nodes and initializers that replace MatMul `node` (A [B, Q, K] x W [K, N]) by `blocks`:
    MatMulNBits, plus for blocks with minimums: + (A summed per block [B, Q, K / 32]) x M^T. The
    block sums of an input are computed once (`block_sums`: (input name, block) -> their name; the
    Q, K and V products share one input, as do gate and up)."""
    from onnx import helper, numpy_helper

    rows, k = blocks.q.shape
    name = f"{weight_name}_nbits"
    arrays = {f"{name}_B": blocks.packed(), f"{name}_scales": blocks.scales.reshape(-1).astype(np.float32),
              f"{name}_zero_points": blocks.packed_zero_points()}
    product = list(node.output) if blocks.minimums is None else [f"{name}_product"]
    nodes = [helper.make_node("MatMulNBits", [node.input[0], *arrays], product, name=name, domain="com.microsoft",
                              K=k, N=rows, bits=blocks.bits, block_size=blocks.block, accuracy_level=accuracy_level)]
    if blocks.minimums is not None:
        source = node.input[0], blocks.block
        if source not in block_sums:
            block_sums[source] = sums = f"{source[0]}_block_sums_{blocks.block}"
            arrays[f"{sums}_shape"] = np.array([0, 0, k // blocks.block, blocks.block], np.int64)  # 0: keep that dim
            arrays[f"{sums}_axis"] = np.array([-1], np.int64)
            nodes += [helper.make_node("Reshape", [source[0], f"{sums}_shape"], [f"{sums}_blocks"]),
                      helper.make_node("ReduceSum", [f"{sums}_blocks", f"{sums}_axis"], [sums], keepdims=0)]
        arrays[f"{name}_minimums"] = np.ascontiguousarray(blocks.minimums.T, np.float32)  # [K / 32, N]
        nodes += [
            helper.make_node("MatMul", [block_sums[source], f"{name}_minimums"], [f"{name}_offset"]),
            helper.make_node("Add", [f"{name}_product", f"{name}_offset"], list(node.output)),
        ]
    return nodes, [numpy_helper.from_array(array, key) for key, array in arrays.items()]
