"""A GGUF file's quantized weights kept quantized in its ONNX export: every MatMul whose weight is a
tensor the file stores in a block format ONNX Runtime's `com.microsoft.MatMulNBits` can express
becomes a MatMulNBits over the file's own blocks, so a forward reads a quarter of the float bytes.

The target stays the dequantized model: MatMulNBits computes `(q - zero_point) * scale` per block of
K, and each format below is that, plus for the formats with a minimum m a second, small product:
x . w = sum over blocks of (d (x_b . q_b) + m (sum of x_b)), so W x = MatMulNBits(x) + sums(x) M^T
with M the [N, K / 32] minimums (1/32 of the weights, float32). ONNX Runtime's fast kernels take
only uint8 zero points, which is why a float zero point -m / d is not used. Block layouts
(ggml-common.h):

| type | block (32 weights) | weight | as MatMulNBits |
|---|---|---|---|
| Q4_0 | d: f16, qs: 16 bytes | d (q - 8) | 4 bits, scale d, zero point 8 |
| Q4_1 | d, m: f16, qs: 16 bytes | d q + m | 4 bits, scale d, zero point 0, minimum m |
| Q5_0 | d: f16, qh: 4 bytes, qs: 16 bytes | d (q - 16) | 8 bits, scale d, zero point 16 |
| Q5_1 | d, m: f16, qh: 4 bytes, qs: 16 bytes | d q + m | 8 bits, scale d, zero point 0, minimum m |
| Q8_0 | d: f16, qs: 32 x int8 | d q | 8 bits, q + 128, scale d, zero point 128 |

In qs byte j holds weight j (low nibble) and weight j + 16 (high nibble); a Q5 weight j's fifth
bit is bit j of qh. MatMulNBits wants weight 2i in the low nibble of byte i, so 4-bit blocks are
repacked (values unchanged); 5-bit ones are stored at 8 bits. Other types (K-quants, IQ formats)
stay float in the graph, each named in one log line.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

BLOCK = 32
# accuracy_level of the MatMulNBits nodes: 0 lets ONNX Runtime compute in float32 (the dequantized
# model up to summation order); 4 quantizes activations to int8 per block (faster, other numbers).
ACCURACY_LEVELS = {"float32": 0, "int8": 4}
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass
class Blocks:
    """One weight [N, K] in MatMulNBits form: q [N, K] (0 .. 2^bits - 1); per block [N, K / BLOCK]
    a scale, a uint8 zero point and, for formats with one, a minimum:
    w = (q - zero_point) * scale + minimum."""

    bits: int
    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    minimums: np.ndarray | None = None

    def rows(self, order: np.ndarray) -> Blocks:
        pick = lambda a: None if a is None else a[order]  # noqa: E731
        return Blocks(self.bits, self.q[order], self.scales[order], self.zero_points[order], pick(self.minimums))

    def packed(self) -> np.ndarray:
        """B [N, K / BLOCK, BLOCK * bits / 8] uint8; 4 bits: weight 2i in the low nibble of byte i."""
        rows, k = self.q.shape
        q = self.q.reshape(rows, k // BLOCK, BLOCK)
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


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 16 bytes per block [..., 16] -> 32 values [..., 32]: low nibbles, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The f16 at byte `at` of every block [..., bytes] -> float32 [...]."""
    return blocks[..., at : at + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """qh [..., 4] bytes -> bit j of the little-endian uint32, as 16 for weight j [..., 32]."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")  # [..., 32]: bit j of the uint32 at j
    return bits.astype(np.uint8) << 4


def _with_minimum(bits: int, q: np.ndarray, d: np.ndarray, m: np.ndarray, rows: int) -> Blocks:
    """Blocks whose weights are d q + m."""
    return Blocks(bits, q.reshape(rows, -1), d, np.zeros(d.shape, np.uint8), m)


def decode(type_name: str, raw: np.ndarray, rows: int) -> Blocks | None:
    """The file's blocks of one weight (raw bytes [N, ...]) in MatMulNBits form; None for a type
    it cannot express."""
    raw = raw.reshape(rows, -1)
    if type_name == "Q4_0":
        blocks = raw.reshape(rows, -1, 18)
        d = _half(blocks, 0)
        return Blocks(4, _nibbles(blocks[..., 2:]).reshape(rows, -1), d, np.full(d.shape, 8, np.uint8))
    if type_name == "Q4_1":
        blocks = raw.reshape(rows, -1, 20)
        return _with_minimum(4, _nibbles(blocks[..., 4:]), _half(blocks, 0), _half(blocks, 2), rows)
    if type_name == "Q5_0":
        blocks = raw.reshape(rows, -1, 22)
        d = _half(blocks, 0)
        q = _nibbles(blocks[..., 6:]) | _fifth_bits(blocks[..., 2:6])
        return Blocks(8, q.reshape(rows, -1), d, np.full(d.shape, 16, np.uint8))
    if type_name == "Q5_1":
        blocks = raw.reshape(rows, -1, 24)
        q = _nibbles(blocks[..., 8:]) | _fifth_bits(blocks[..., 4:8])
        return _with_minimum(8, q, _half(blocks, 0), _half(blocks, 2), rows)
    if type_name == "Q8_0":
        blocks = raw.reshape(rows, -1, 34)
        d = _half(blocks, 0)
        q = (blocks[..., 2:].copy().view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Blocks(8, q.reshape(rows, -1), d, np.full(d.shape, 128, np.uint8))
    return None


def _row_digests(matrix: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in np.ascontiguousarray(matrix, np.float32)]


class GgufWeights:
    """The 2-D tensors of a GGUF file, found by value: a graph weight W^T [N, K] is a file tensor
    whose dequantized rows are W^T's rows in some order (llama.cpp stores Q and K rows permuted
    for its rotary layout), so no name mapping is needed."""

    def __init__(self, path: Path):
        from gguf import GGUFReader
        from gguf.quants import dequantize

        self.by_rows: dict[bytes, tuple[object, list[bytes]]] = {}
        for tensor in GGUFReader(str(path)).tensors:
            if len(tensor.shape) != 2:
                continue
            values = dequantize(tensor.data, tensor.tensor_type).reshape(int(tensor.shape[1]), int(tensor.shape[0]))
            digests = _row_digests(values)
            self.by_rows[_multiset(digests)] = (tensor, digests)

    def find(self, weight_t: np.ndarray) -> tuple[str, Blocks | None, str] | None:
        """For W^T [N, K] from the graph -> (file tensor name, its blocks in W^T's row order or None
        when its type cannot be expressed, its type), or None if no file tensor holds these values."""
        digests = _row_digests(weight_t)
        match = self.by_rows.get(_multiset(digests))
        if match is None:
            return None
        tensor, file_digests = match
        type_name = tensor.tensor_type.name
        if weight_t.shape[1] % BLOCK:
            return tensor.name, None, type_name
        blocks = decode(type_name, np.asarray(tensor.data), weight_t.shape[0])
        if blocks is None:
            return tensor.name, None, type_name
        row_of = {digest: i for i, digest in enumerate(file_digests)}
        return tensor.name, blocks.rows(np.array([row_of[d] for d in digests])), type_name


def _multiset(digests: list[bytes]) -> bytes:
    return hashlib.blake2b(b"".join(sorted(digests)), digest_size=16).digest()


def quantize_graph(onnx_path: Path, gguf_path: Path, accuracy: str = "float32") -> dict:
    """Rewrite the graph at `onnx_path` in place: each MatMul by a weight that `gguf_path` stores in
    an expressible block format becomes a MatMulNBits over those blocks. -> a summary for the
    manifest: {"accuracy": ..., "quantized": {type: count}, "float": {type: count}}."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        onnx.load_external_data_for_model(model, str(onnx_path.parent))
    graph = model.graph
    weights = GgufWeights(gguf_path)
    quantized, kept = Counter(), Counter()
    nodes, block_sums = [], {}
    for node in graph.node:
        weight_t = _weight_t(graph, node) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight_t is None:
            nodes.append(node)
            continue
        init_name, weight_t = weight_t
        found = weights.find(weight_t)
        if found is None:
            nodes.append(node)
            continue
        name, blocks, type_name = found
        if blocks is None or (blocks.bits == 8 and accuracy == "float32"):
            if type_name not in FLOAT_TYPES:
                why = ("MatMulNBits cannot express" if blocks is None else
                       "onnxruntime has no float32-activation kernel for 8-bit blocks (--activations int8 has one)")
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
    for old in onnx_path.parent.glob(f"{onnx_path.name}?*"):  # the float weights' external data
        old.unlink()
    onnx.save(model, str(onnx_path), save_as_external_data=bool(external), location=f"{onnx_path.name}.data")
    return {"accuracy": accuracy, "quantized": dict(quantized), "float": dict(kept)}


def _weight_t(graph, node) -> tuple[str, np.ndarray] | None:
    """The float32 weight of MatMul `node` as W^T [N, K], with its initializer's name: an
    initializer [K, N] (a Linear's weight, transposed when exported), or the Transpose of one
    [N, K] (a weight tied to the embedding) -> None for any other second input."""
    import onnx
    from onnx import numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    name, transposed = node.input[1], True
    if name not in initializers:
        producer = next((n for n in graph.node if name in n.output), None)
        perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"), [1, 0]) if producer is not None else None
        if producer is None or producer.op_type != "Transpose" or perm != [1, 0]:
            return None
        name, transposed = producer.input[0], False
    init = initializers.get(name)
    if init is None or len(init.dims) != 2 or init.data_type != onnx.TensorProto.FLOAT:
        return None
    weight = numpy_helper.to_array(init)
    return name, weight.T if transposed else weight


def matmul_nbits(node, weight_name: str, blocks: Blocks, accuracy_level: int, block_sums: dict[str, str]) -> tuple[list, list]:
    """The nodes and initializers that replace MatMul `node` (A [B, Q, K] x W [K, N]) by `blocks`:
    MatMulNBits, plus for blocks with minimums: + (A summed per block [B, Q, K / 32]) x M^T. The
    block sums of an input are computed once (`block_sums`: input name -> their name; the Q, K
    and V products share one input, as do gate and up)."""
    from onnx import helper, numpy_helper

    rows, k = blocks.q.shape
    name = f"{weight_name}_nbits"
    arrays = {f"{name}_B": blocks.packed(), f"{name}_scales": blocks.scales.reshape(-1).astype(np.float32),
              f"{name}_zero_points": blocks.packed_zero_points()}
    product = list(node.output) if blocks.minimums is None else [f"{name}_product"]
    nodes = [helper.make_node("MatMulNBits", [node.input[0], *arrays], product, name=name, domain="com.microsoft",
                              K=k, N=rows, bits=blocks.bits, block_size=BLOCK, accuracy_level=accuracy_level)]
    if blocks.minimums is not None:
        source = node.input[0]
        if source not in block_sums:
            block_sums[source] = sums = f"{source}_block_sums"
            arrays[f"{sums}_shape"] = np.array([0, 0, k // BLOCK, BLOCK], np.int64)  # 0: keep that dim
            arrays[f"{sums}_axis"] = np.array([-1], np.int64)
            nodes += [helper.make_node("Reshape", [source, f"{sums}_shape"], [f"{sums}_blocks"]),
                      helper.make_node("ReduceSum", [f"{sums}_blocks", f"{sums}_axis"], [sums], keepdims=0)]
        arrays[f"{name}_minimums"] = np.ascontiguousarray(blocks.minimums.T, np.float32)  # [K / 32, N]
        nodes += [
            helper.make_node("MatMul", [block_sums[source], f"{name}_minimums"], [f"{name}_offset"]),
            helper.make_node("Add", [f"{name}_product", f"{name}_offset"], list(node.output)),
        ]
    return nodes, [numpy_helper.from_array(array, key) for key, array in arrays.items()]
