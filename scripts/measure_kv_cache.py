"""Per-step cost of KV growth and compaction vs sequence length: the PyTorch backend's
preallocated buffer against transformers' DynamicCache (torch.cat growth + crop).

Each step appends a 5-node chain (one forward, Q=5) and commits 3 of the entries, as a
speculative step does. The first table times the cache operations alone (one layer, H=4, D=64);
the second whole steps of a small Llama, where attention itself grows with the length in both.
The buffer figures include the amortised copy when the buffer doubles.
Usage: python scripts/measure_kv_cache.py [--lengths 256,1024,4096,8192] [--steps 50]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from specdec.backends.pytorch import PyTorchBackend, _BufferLayer
from specdec.hf_compat import cache_argument

Q, KEEP = 5, 3


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1 << 15,
    )
    return LlamaForCausalLM(config).eval()


def time_backend(model, length: int, steps: int) -> float:
    backend = PyTorchBackend(model)
    backend.prefill(torch.randint(0, 512, (1, length)))
    mask = torch.ones(Q, Q, dtype=torch.bool).tril()[None]
    ids = torch.randint(0, 512, (1, Q))
    start = time.perf_counter()
    for _ in range(steps):
        positions = torch.arange(backend.committed_len, backend.committed_len + Q)[None]
        backend.forward(ids, positions, mask)
        backend.commit([0, 2, 4])  # not a prefix: entries move
    return (time.perf_counter() - start) / steps


@torch.inference_mode()
def time_dynamic_cache(model, length: int, steps: int) -> float:
    cache = DynamicCache(config=model.config)
    cache_kwarg = {cache_argument(model): cache}
    model(torch.randint(0, 512, (1, length)), use_cache=True, logits_to_keep=1, **cache_kwarg)
    ids = torch.randint(0, 512, (1, Q))
    keep = torch.tensor([0, 2, 4])
    start = time.perf_counter()
    for _ in range(steps):
        committed = cache.get_seq_length()
        mask = torch.zeros(1, 1, Q, committed + Q)
        mask[..., committed:] = torch.full((Q, Q), torch.finfo(torch.float32).min).triu(1)
        model(ids, position_ids=torch.arange(committed, committed + Q)[None], attention_mask=mask,
              use_cache=True, **cache_kwarg)
        for layer in cache.layers:  # compact: gather the kept entries, concatenate (O(length))
            layer.keys = torch.cat([layer.keys[..., :committed, :], layer.keys[..., committed + keep, :]], dim=-2)
            layer.values = torch.cat([layer.values[..., :committed, :], layer.values[..., committed + keep, :]], dim=-2)
    return (time.perf_counter() - start) / steps


def time_cache_ops(length: int, steps: int) -> tuple[float, float]:
    """Append Q entries and compact to KEEP of them, one layer: (buffer, torch.cat) seconds."""
    heads, dim = 4, 64
    new, keep = torch.randn(1, heads, Q, dim), torch.tensor([0, 2, 4])
    layer = _BufferLayer()
    layer.update(torch.randn(1, heads, length, dim), torch.randn(1, heads, length, dim))
    start = time.perf_counter()
    for _ in range(steps):
        committed = layer.length
        layer.update(new, new)
        layer.move(keep + committed, committed)
        layer.length = committed + KEEP
    ours = (time.perf_counter() - start) / steps
    keys, values = torch.randn(1, heads, length, dim), torch.randn(1, heads, length, dim)
    start = time.perf_counter()
    for _ in range(steps):
        committed = keys.shape[-2]
        keys, values = torch.cat([keys, new], -2), torch.cat([values, new], -2)
        keys = torch.cat([keys[..., :committed, :], keys[..., committed + keep, :]], -2)
        values = torch.cat([values[..., :committed, :], values[..., committed + keep, :]], -2)
    return ours, (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024,4096,8192")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    lengths = list(map(int, args.lengths.split(",")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Q={Q}, keep {KEEP}")
    print("\nCache operations alone, microseconds per step and layer")
    print("| committed length | preallocated buffer | torch.cat | ratio |")
    print("|---:|---:|---:|---:|")
    for length in lengths:
        ours, theirs = time_cache_ops(length, 4 * args.steps)
        print(f"| {length} | {ours * 1e6:.1f} | {theirs * 1e6:.1f} | {theirs / ours:.1f}x |")
    model = build_model()
    print("\nWhole steps of a 4-layer Llama (hidden 256), milliseconds per step")
    print("| committed length | preallocated buffer | DynamicCache + cat | ratio |")
    print("|---:|---:|---:|---:|")
    for length in lengths:
        time_backend(model, length, 5)  # warm-up
        ours = time_backend(model, length, args.steps)
        theirs = time_dynamic_cache(model, length, args.steps)
        print(f"| {length} | {ours * 1e3:.2f} | {theirs * 1e3:.2f} | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    main()
