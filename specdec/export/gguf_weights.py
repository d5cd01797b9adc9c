"""A GGUF file's quantized weights in MatMulNBits form (specdec.export.nbits), so its ONNX export
keeps them quantized and a forward reads a quarter of the float bytes. The target stays the
dequantized model: each format below is exactly (q - zero_point) * scale (+ minimum) with the file's
own numbers (ggml-common.h block layouts):

| type | block (32 weights) | weight | as MatMulNBits |
|---|---|---|---|
| Q4_0 | d: f16, qs: 16 bytes | d (q - 8) | 4 bits, scale d, zero point 8 |
| Q4_1 | d, m: f16, qs: 16 bytes | d q + m | 4 bits, scale d, zero point 0, minimum m |
| Q5_0 | d: f16, qh: 4 bytes, qs: 16 bytes | d (q - 16) | 8 bits, scale d, zero point 16 |
| Q5_1 | d, m: f16, qh: 4 bytes, qs: 16 bytes | d q + m | 8 bits, scale d, zero point 0, minimum m |
| Q8_0 | d: f16, qs: 32 x int8 | d q | 8 bits, q + 128, scale d, zero point 128 |
| Q4_K | 256 weights: d, dmin: f16, 8 x 6-bit (sc, m), qs: 128 bytes | d sc q - dmin m per 32 | 4 bits, scale d sc, zero point 0, minimum -dmin m |
| Q5_K | as Q4_K, and qh: 32 bytes (a fifth bit) | d sc q - dmin m per 32 | 8 bits, scale d sc, zero point 0, minimum -dmin m |
| Q6_K | 256 weights: ql: 128, qh: 64 bytes, 16 x int8 sc, d: f16 | d sc (q - 32) per 16 | 8 bits in blocks of 16, scale d sc, zero point 32 |

In qs byte j holds weight j (low nibble) and weight j + 16 (high nibble); a Q5 weight j's fifth
bit is bit j of qh. MatMulNBits wants weight 2i in the low nibble of byte i, so 4-bit blocks are
repacked (values unchanged); 5- and 6-bit ones are stored at 8 bits. In a Q4_K / Q5_K block each
32 bytes of qs hold two sub-blocks (low nibbles, then high; Q5_K's fifth bits are bits 2k and 2k + 1
of qh for chunk k), and sub-block j's 6-bit scale and minimum are packed in 12 bytes (ggml's
get_scale_min_k4). In a Q6_K half (128 weights) 64 bytes of ql and 32 of qh give four runs of 32
weights: low nibbles of ql[0:32], of ql[32:64], high nibbles of each, with bit pairs 0, 2, 4, 6 of
qh. Other types (Q2_K, Q3_K, IQ formats) stay float in the graph, each named in one log line.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from specdec.export.nbits import BLOCK, Blocks

FLOAT_TYPES = ("F32", "F16", "BF16")  # weights the file does not quantize


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


def _super_blocks(bits: int, q: np.ndarray, blocks: np.ndarray, rows: int) -> Blocks:
    """Q4_K / Q5_K: q [N, K / 256, 4, 64] with d, dmin and the 12 bytes of packed 6-bit scales and
    minimums of each 256-weight block -> blocks of 32, w = d sc q - dmin m."""
    d, dmin = _half(blocks, 0)[..., None], _half(blocks, 2)[..., None]  # [N, K / 256, 1]
    packed = blocks[..., 4:16]  # [N, K / 256, 12]
    low, high = packed[..., 0:4], packed[..., 4:8]
    scales = np.concatenate([low & 63, (packed[..., 8:12] & 0x0F) | ((low >> 6) << 4)], axis=-1)  # [.., 8]
    minimums = np.concatenate([high & 63, (packed[..., 8:12] >> 4) | ((high >> 6) << 4)], axis=-1)
    return Blocks(bits, q.reshape(rows, -1), (d * scales).reshape(rows, -1), np.zeros((rows, scales[0].size), np.uint8),
                  -(dmin * minimums).reshape(rows, -1))


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
    if type_name in ("Q4_K", "Q5_K"):
        five = type_name == "Q5_K"
        blocks = raw.reshape(rows, -1, 176 if five else 144)
        qs = blocks[..., 48 if five else 16 :].reshape(rows, -1, 4, 32)  # 4 chunks of 2 sub-blocks
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [N, K / 256, 4, 64]: sub-blocks 2k, 2k + 1
        if five:
            qh, chunk = blocks[..., None, 16:48], np.arange(4, dtype=np.uint8)[:, None]  # [N, K / 256, 1, 32], [4, 1]
            q |= np.concatenate([(qh >> (2 * chunk)) & 1, (qh >> (2 * chunk + 1)) & 1], axis=-1) << 4
        return _super_blocks(8 if five else 4, q, blocks, rows)
    if type_name == "Q6_K":
        blocks = raw.reshape(rows, -1, 210)
        ql, qh = blocks[..., :128].reshape(rows, -1, 2, 64), blocks[..., 128:192].reshape(rows, -1, 2, 32)
        a, b = ql[..., :32], ql[..., 32:]
        q = np.concatenate([(a & 0x0F) | ((qh & 3) << 4), (b & 0x0F) | (((qh >> 2) & 3) << 4),
                            (a >> 4) | (((qh >> 4) & 3) << 4), (b >> 4) | (((qh >> 6) & 3) << 4)], axis=-1)
        scales = _half(blocks, 208)[..., None] * blocks[..., 192:208].copy().view(np.int8)  # [N, K / 256, 16]
        return Blocks(8, q.reshape(rows, -1), scales.reshape(rows, -1), np.full((rows, scales[0].size), 32, np.uint8), block=16)
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


