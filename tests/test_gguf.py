"""GGUF checkpoints: exact conversion to a cached Hugging Face folder, its tokenizer, clear errors, the CLI."""

import json
import os
import random
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import yaml

import specdec.models
from helpers import hf_greedy
from specdec.backends.pytorch import PyTorchBackend, PyTorchOptions
from specdec.cli import main
from specdec.errors import SpecdecError
from specdec.models import gguf_folder, load_tokenizer, resolve_source
from tiny_models import tiny_model

gguf = pytest.importorskip("gguf", reason="needs the [gguf] extra")

LAYER_NAMES = {  # transformers name in model.layers.N -> llama.cpp name in blk.N
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
# A byte-level BPE vocabulary of 96 tokens: printable ASCII (ids 0..93), the space "Ġ" (94) and "ab" (95).
TOKENS = [chr(c) for c in range(0x21, 0x7F)] + ["\u0120", "ab"]


def permute(weights, n_head, n_head_kv):
    """llama.cpp's convert_hf_to_gguf.py reordering of the Q/K rows for its rotary layout."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def write_gguf(path, model, float_type="F32", tokenizer=False, quant: str | None = None):
    """`model` (a Llama) as llama.cpp would write it; with F16, 2-D weights are F16 and norms F32;
    with `quant` (a ggml block type such as Q4_1), 2-D weights are stored in it, the embedding and
    output in Q8_0 as llama.cpp's quantize leaves them. gguf cannot quantize to K-quants: with one,
    the linear weights become random blocks of it (the file then defines the model)."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(TOKENS)
        writer.add_token_types([1] * len(TOKENS))  # 1: NORMAL
        writer.add_token_merges(["a b"])
    state = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"]}
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in LAYER_NAMES.items():
            weights = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weights = permute(weights, c.num_attention_heads, c.num_attention_heads)
            elif gguf_name == "attn_k":
                weights = permute(weights, c.num_attention_heads, c.num_key_value_heads)
            tensors[f"blk.{i}.{gguf_name}.weight"] = weights
    tensors |= {"output_norm.weight": state["model.norm.weight"], "output.weight": state["lm_head.weight"]}
    for name, weights in tensors.items():
        if quant in K_QUANTS and weights.ndim == 2 and name.startswith("blk."):
            writer.add_tensor(name, random_k_quant(quant, *weights.shape), raw_dtype=gguf.GGMLQuantizationType[quant])
            continue
        if quant and weights.ndim == 2:
            qtype = gguf.GGMLQuantizationType["Q8_0" if name in ("token_embd.weight", "output.weight") else quant]
            writer.add_tensor(name, gguf.quants.quantize(weights.astype(np.float32), qtype), raw_dtype=qtype)
            continue
        writer.add_tensor(name, weights.astype(np.float16 if float_type == "F16" and weights.ndim == 2 else np.float32))
    return finish(writer, path)


K_QUANTS = {"Q4_K": (144, {0: 0.002, 2: 0.004}), "Q5_K": (176, {0: 0.001, 2: 0.004}), "Q6_K": (210, {208: 0.0005})}


def random_k_quant(qtype: str, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """K-quant blocks [rows, columns / 256 x bytes] of random quants and packed scales (any bytes
    are valid), with small f16 d (and dmin)."""
    size, halves = K_QUANTS[qtype]
    raw = np.random.default_rng(seed).integers(0, 256, (rows, columns // 256, size), dtype=np.uint8)
    for at, value in halves.items():
        raw[..., at : at + 2] = np.array([value], np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def finish(writer, path):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def leftovers(cache_dir):
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


@pytest.fixture(scope="module")
def original():
    return tiny_model("llama", 0)


@pytest.fixture
def gguf_path(tmp_path, original):
    return write_gguf(tmp_path / "tiny.gguf", original)


@pytest.mark.parametrize("float_type", ["F32", "F16"])
def test_gguf_gives_the_original_weights_and_logits(tmp_path, original, float_type):
    path = write_gguf(tmp_path / "tiny.gguf", original, float_type)
    original.save_pretrained(tmp_path / "safetensors")
    from_gguf = PyTorchBackend.load(str(path), PyTorchOptions()).model
    from_folder = PyTorchBackend.load(str(tmp_path / "safetensors"), PyTorchOptions()).model
    got, want = from_gguf.state_dict(), from_folder.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        if float_type == "F16" and tensor.ndim == 2:
            assert not torch.equal(tensor, tensor.half().float())  # the file really is rounded
            tensor.copy_(tensor.half().float())  # the safetensors copy, rounded as the file stores it
        assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor), name
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected = from_gguf(ids).logits, from_folder(ids).logits
    # rms_norm_eps passes through a float32 in the file (1e-6 -> 9.99999997e-07): equal up to float noise
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert logits.std() > 0.1  # not a degenerate model


def test_tokenizer_comes_from_the_gguf_metadata(tmp_path, original, gguf_path, cache_dir):
    tokenizer = load_tokenizer(str(write_gguf(tmp_path / "tok.gguf", original, tokenizer=True)))
    ids = tokenizer.encode("ab ab!", add_special_tokens=False)
    assert ids == [95, 94, 95, 0] and tokenizer.decode(ids) == "ab ab!"  # "ab" is the merge "a b"; "Ġ" a space
    assert load_tokenizer(str(gguf_path)) is None  # a weights-only file: no tokenizer, but a model all the same
    assert len(leftovers(cache_dir)) == 2


def test_conversion_is_cached(gguf_path, cache_dir, monkeypatch):
    first = PyTorchBackend.load(str(gguf_path), PyTorchOptions()).model
    (folder,) = leftovers(cache_dir)
    assert folder.startswith("tiny-") and folder.endswith("-float32")
    assert (cache_dir / folder / "config.json").is_file()
    convert = mock.Mock(side_effect=AssertionError("converted again"))
    monkeypatch.setattr(specdec.models, "_convert_gguf", convert)
    second = PyTorchBackend.load(str(gguf_path), PyTorchOptions()).model
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert gguf_folder(gguf_path, None) == cache_dir / folder  # dtype=None takes the conversion there is
    with pytest.raises(AssertionError, match="converted again"):
        resolve_source(str(gguf_path), "float16")  # another dtype is another conversion
    stat = gguf_path.stat()
    os.utime(gguf_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="converted again"):
        resolve_source(str(gguf_path))  # a changed file is converted anew
    assert leftovers(cache_dir) == [folder] and convert.call_count == 2


@pytest.mark.parametrize(
    "name, content",
    [("random.gguf", random.Random(0).randbytes(4096)), ("notes.txt", b"a text file\n"), ("empty.gguf", b"")],
)
def test_a_file_that_is_not_gguf_is_refused(tmp_path, cache_dir, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SpecdecError, match="is a file but not a GGUF checkpoint") as info:
        PyTorchBackend.load(str(path), PyTorchOptions())
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert leftovers(cache_dir) == []


def test_an_architecture_transformers_cannot_read_is_one_line(tmp_path, cache_dir):
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "notarealarch")
    writer.add_block_count(1)
    writer.add_uint32("notarealarch.vocab_size", 8)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    finish(writer, path)
    with pytest.raises(SpecdecError) as info:
        PyTorchBackend.load(str(path), PyTorchOptions())
    message = str(info.value)
    assert type(info.value) is SpecdecError and "\n" not in message
    assert message.startswith(f"transformers cannot read {str(path)!r} as a model: ") and "notarealarch" in message
    assert leftovers(cache_dir) == []  # nothing half-written is kept


def test_a_truncated_gguf_is_one_line(tmp_path, gguf_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(gguf_path.read_bytes()[:100])  # a download stopped inside the metadata
    with pytest.raises(SpecdecError, match="transformers cannot read"):
        resolve_source(str(path))


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
        sys.exit(0)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def write_config(tmp_path, model):
    # ignore_eos: a file without tokenizer.ggml.eos_token_id gets LlamaConfig's default EOS (2)
    data = {"target": {"model": str(model)}, "strategy": {"name": "ar"},
            "generation": {"max_new_tokens": 5, "ignore_eos": True}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_runs_a_gguf_target(tmp_path, capsys, original, gguf_path):
    config = write_config(tmp_path, gguf_path)
    code, out, _ = run_cli(capsys, "run", str(config), "--prompt-ids", "1,2,3", "--json")
    assert code == 0
    token_ids = json.loads(out)["token_ids"]
    assert len(token_ids) == 5 and token_ids == hf_greedy(original, [1, 2, 3], 5)


def test_a_gguf_target_and_draft_on_onnxruntime(tmp_path, original, gguf_path, cache_dir):
    """The GGUF is exported to ONNX on first use (from its converted folder), and a chain with the
    same GGUF as the draft reproduces the original model's greedy output."""
    pytest.importorskip("onnxruntime", reason="needs the [onnx] extra")
    from specdec.config import load_config
    from specdec.decoder import SpeculativeDecoder

    data = {"target": {"model": str(gguf_path), "backend": "onnxruntime"}, "draft": {"model": str(gguf_path)},
            "strategy": {"name": "chain", "k": 3}, "generation": {"max_new_tokens": 12, "ignore_eos": True}}
    out = SpeculativeDecoder.from_config(load_config(data=data)).generate([1, 2, 3])
    assert out.token_ids == hf_greedy(original, [1, 2, 3], 12)
    assert len(list((cache_dir.parent / "onnx").iterdir())) == 1 and out.metrics.mean_accepted_length > 3


def test_cli_on_a_file_that_is_not_gguf(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_text("not a model\n")
    code, out, err = run_cli(capsys, "run", str(write_config(tmp_path, bad)), "--prompt-ids", "1,2,3", "--json")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "is a file but not a GGUF checkpoint" in err, err
