"""ONNX export with a dynamic tree-mask input, and the onnxruntime backend."""

import functools
import json
import logging
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="needs the [onnx] extra (onnx, onnxscript, onnxruntime)")

from helpers import hf_greedy, load_script, make_decoder  # noqa: E402
from specdec.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeOptions, create_session  # noqa: E402
from specdec.backends.pytorch import PyTorchBackend  # noqa: E402
from specdec.cli import main  # noqa: E402
from specdec.backends.onnx_contract import MANIFEST, read_manifest  # noqa: E402
from specdec.config import GenerationOptions, ModelSpec  # noqa: E402
from specdec.decoder import SpeculativeDecoder, load_backend  # noqa: E402
from specdec.errors import SpecdecError  # noqa: E402
from specdec.export.onnx import check_export, export_onnx  # noqa: E402
from specdec.plugins import get_strategy  # noqa: E402

PROMPT = [3, 17, 42, 8, 60, 5]


@pytest.fixture(scope="module")
def exports(onnx_export):
    """arch -> (source model folder, export folder) for tiny Llama, Qwen2 and GPT-2 (read-only)."""
    from conftest import cached_model

    folders = {arch: onnx_export(f"{arch}-0", functools.partial(cached_model, arch, 0)) for arch in ("llama", "qwen2", "gpt2")}
    return {arch: (folder.parent / "src", folder) for arch, folder in folders.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_export_matches_pytorch_at_unseen_sizes(arch, exports):
    _, folder = exports[arch]
    assert {"model.onnx", MANIFEST, "config.json"} <= {p.name for p in folder.iterdir()}
    manifest = read_manifest(folder)
    assert manifest["inputs"][:3] == ["input_ids", "position_ids", "attention_mask"]
    assert manifest["outputs"][1:3] == ["present.0.key", "present.0.value"] and manifest["vocab_size"] == 96
    result = check_export(folder)
    assert result["ok"] and result["max_abs_diff"] < 1e-4 and result["greedy_agree"]
    assert {(c["query"], c["past"]) for c in result["cases"]} >= {(1, 7), (9, 0)}  # the export saw 3 / 5


def test_validation_against_another_model_fails_and_keeps_the_export(exports, tmp_path, capsys):
    from conftest import cached_model
    from specdec.cli import main

    _, folder = exports["llama"]
    cached_model("llama", 1).save_pretrained(tmp_path / "other")
    result = check_export(folder, str(tmp_path / "other"))
    assert not result["ok"] and result["relative_diff"] > result["tolerance"] and result["max_prob_diff"] > 1e-3
    with pytest.raises(SystemExit) as info:
        main(["export", str(tmp_path / "other"), "--check", str(folder)])
    captured = capsys.readouterr()
    assert info.value.code == 1 and "of the largest logit" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "kept in" in errors[0] and "Traceback" not in captured.err
    assert (folder / "model.onnx").is_file()


@pytest.mark.parametrize("strategy, options", [("chain", {"k": 3}), ("static_tree", {"branching": [2, 2]}),
                                               ("gsd", {"max_nodes": 12}), ("dyspec", {"max_nodes": 8})])
@pytest.mark.parametrize("placement", ["target", "draft", "both"])
def test_greedy_output_is_lossless_on_onnxruntime(strategy, options, placement, exports, models, drafts):
    _, folder = exports["llama"]
    target_model = models("llama", 0)
    ort = lambda: OnnxRuntimeBackend.load(str(folder), OnnxRuntimeOptions())  # noqa: E731
    target = ort() if placement in ("target", "both") else PyTorchBackend(target_model)
    draft = ort() if placement in ("draft", "both") else PyTorchBackend(drafts("llama", "perturbed"))
    component = get_strategy(strategy)
    decoder = SpeculativeDecoder(target, draft, component.cls(component.cls.Options(**options)), GenerationOptions())
    out = decoder.generate(PROMPT, max_new_tokens=60)
    assert out.token_ids == hf_greedy(target_model, PROMPT, 60)
    assert out.metrics.accepted_tokens > 0


def test_a_hugging_face_model_is_exported_on_first_use(exports, tmp_path, caplog):
    source, _ = exports["gpt2"]
    spec = ModelSpec(str(source), "onnxruntime", OnnxRuntimeOptions(cache_dir=str(tmp_path / "cache")))
    with caplog.at_level(logging.WARNING):
        backend = load_backend(spec)
    assert "exporting" in caplog.text and "first use" in caplog.text
    assert list((tmp_path / "cache").glob(f"*/{MANIFEST}"))
    caplog.clear()
    load_backend(spec)  # reused, not exported again
    assert "exporting" not in caplog.text
    assert backend.vocab_size == 96


def test_cli_check_prints_the_difference(exports, capsys):
    main(["export", "--check", str(exports["qwen2"][1])])
    assert "greedy choices agree: yes" in capsys.readouterr().out


def test_a_folder_that_is_not_an_export(tmp_path):
    with pytest.raises(SpecdecError, match="is not a specdec ONNX export"):
        OnnxRuntimeBackend.load(str(tmp_path), OnnxRuntimeOptions())


def test_a_manifest_from_an_incompatible_version(exports, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(exports["llama"][1], folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["format_version"] = 99
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SpecdecError, match="version 99 .* this specdec reads 'specdec-onnx' versions 2, 3, 4, 5, 6: export the model again"):
        OnnxRuntimeBackend.load(str(folder), OnnxRuntimeOptions())


@pytest.fixture(scope="module")
def format3(exports, tmp_path_factory):
    """An export of format 3, as specdec wrote it before logit_positions: the format-4 graph of the
    tiny Llama with that input replaced by 0 .. Q - 1 (every position's logits), and its manifest."""
    import onnx
    from onnx import helper, numpy_helper

    folder = tmp_path_factory.mktemp("v3") / "onnx"
    shutil.copytree(exports["llama"][1], folder)
    model = onnx.load(str(folder / "model.onnx"))
    graph = model.graph
    graph.input.remove(next(i for i in graph.input if i.name == "logit_positions"))
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), name) for name, v in
                             (("v3_zero", 0), ("v3_one", 1), ("v3_axis", [0])))
    for node in reversed([helper.make_node("Shape", ["input_ids"], ["v3_query"], start=1, end=2),
                          helper.make_node("Squeeze", ["v3_query", "v3_axis"], ["v3_q"]),
                          helper.make_node("Range", ["v3_zero", "v3_q", "v3_one"], ["logit_positions"])]):
        graph.node.insert(0, node)
    onnx.save(model, str(folder / "model.onnx"))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["format_version"], manifest["inputs"] = 3, manifest["inputs"][:-1]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_a_prefill_returns_the_last_logits_alone_from_format_4(exports, format3, monkeypatch):
    """Format 4 runs the output projection on a prefill's last position only; format 3 on all."""
    shapes = []
    execute = OnnxRuntimeBackend.execute
    monkeypatch.setattr(OnnxRuntimeBackend, "execute", lambda self, i, o: (shapes.append(tuple(o[0].shape)), execute(self, i, o)))
    for folder, prefill_logits in ((exports["llama"][1], (1, 1, 96)), (format3, (1, len(PROMPT), 96))):
        target = OnnxRuntimeBackend.load(str(folder), OnnxRuntimeOptions())
        shapes.clear()
        target.prefill(torch.tensor([PROMPT]))
        target.forward(torch.tensor([[5, 6]]), torch.tensor([[6, 7]]), torch.ones(1, 2, 2, dtype=torch.bool).tril_())
        assert shapes == [prefill_logits, (1, 2, 96)]


def test_prefill_chunks_read_only_the_filled_slots(exports, monkeypatch):
    """Each prefill chunk's past is the entries already prefilled (one hidden sentinel slot for the
    first chunk), not the whole buffer, which always holds the chunk's slots too; a tree forward
    after it reads the buffer in place. The logits equal a one-chunk prefill's."""
    pasts = []
    execute = OnnxRuntimeBackend.execute
    monkeypatch.setattr(OnnxRuntimeBackend, "execute", lambda self, i, o: (pasts.append(i[3].shape[2]), execute(self, i, o)))
    prompt = PROMPT * 2  # 12 tokens: chunks of 5, 5 and 2
    chunked = OnnxRuntimeBackend.load(str(exports["llama"][1]), OnnxRuntimeOptions(prefill_chunk=5))
    logits = chunked.prefill(torch.tensor([prompt]))
    assert pasts == [1, 5, 10]
    tree = chunked.forward(torch.tensor([[5, 6]]), torch.tensor([[12, 13]]), torch.ones(1, 2, 2, dtype=torch.bool).tril_())
    assert pasts[3] == chunked.kv[0].shape[2] >= 14
    whole = OnnxRuntimeBackend.load(str(exports["llama"][1]), OnnxRuntimeOptions(prefill_chunk=16))
    assert torch.allclose(whole.prefill(torch.tensor([prompt])), logits, atol=1e-5)
    assert torch.allclose(whole.forward(torch.tensor([[5, 6]]), torch.tensor([[12, 13]]), torch.ones(1, 2, 2, dtype=torch.bool).tril_()),
                          tree, atol=1e-5)


def test_compare_prefill_times_both_exports_in_turn(exports, format3, monkeypatch):
    script = load_script("compare_prefill")
    backends = {v: OnnxRuntimeBackend.load(str(f), OnnxRuntimeOptions()) for v, f in (("6", exports["llama"][1]), ("3", format3))}
    order = []
    prefill = OnnxRuntimeBackend.prefill
    monkeypatch.setattr(OnnxRuntimeBackend, "prefill", lambda self, ids: (order.append(self.manifest["format_version"]), prefill(self, ids))[1])
    seconds = script.prefill_seconds(backends, [PROMPT, PROMPT[:3]], repeats=2)
    assert {k: len(v) for k, v in seconds.items()} == {"6": 2, "3": 2} and all(t > 0 for v in seconds.values() for t in v)
    assert order == [6, 6, 3, 3] * 2  # every prompt, one export after the other, per repeat


@pytest.fixture(scope="module")
def unfused(exports, tmp_path_factory):
    """arch -> an export of format 4, as specdec wrote it before fusing sibling projections."""
    from unittest import mock

    out = {}
    for arch in ("llama", "qwen2"):
        with mock.patch("specdec.export.onnx.fuse_sibling_matmuls", return_value=0):
            folder = export_onnx(str(exports[arch][0]), tmp_path_factory.mktemp("v4") / arch)
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["format_version"] = 4
        del manifest["fused_matmuls"]
        (folder / MANIFEST).write_text(json.dumps(manifest))
        out[arch] = folder
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sibling_projections_are_fused_without_changing_a_logit(arch, exports, unfused, models):
    """Query, key and value projections, and gate and up, become one MatMul each: 3 fewer per
    layer, and the same logits to the bit as the unfused format-4 export, which still loads."""
    import onnx

    from specdec.export.onnx import _random_tree, graph_logits
    from specdec.export.onnx_graph import KVShape

    _, folder = exports[arch]
    manifest, layers = read_manifest(folder), read_manifest(unfused[arch])["layers"]
    matmuls = {f: sum(n.op_type == "MatMul" for n in onnx.load(str(f / "model.onnx")).graph.node) for f in (folder, unfused[arch])}
    assert manifest["fused_matmuls"] == 3 * layers == matmuls[unfused[arch]] - matmuls[folder]
    fused, plain = (OnnxRuntimeBackend.load(str(f), OnnxRuntimeOptions()) for f in (folder, unfused[arch]))
    shape, gen = KVShape(layers, manifest["kv_heads"], manifest["head_dim"]), torch.Generator().manual_seed(1)
    for query, past, unused in ((1, 9, 2), (7, 4, 0), (13, 30, 5)):
        inputs = _random_tree(shape, manifest["vocab_size"], torch.float32, query, past, unused, gen)
        assert torch.equal(graph_logits(fused, *inputs), graph_logits(plain, *inputs))
    ar = get_strategy("ar").cls
    decoder = SpeculativeDecoder(plain, None, ar(ar.Options()), GenerationOptions())
    assert decoder.generate(PROMPT, max_new_tokens=20).token_ids == hf_greedy(models(arch, 0), PROMPT, 20)


def _where_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, specdec_past=None, **kwargs):
    """Format 5's attention: as `tree_attention`, but applying the bool mask [B,1,Q,C+Q] by a Where
    over every layer's scores."""
    from specdec.attention import HIDDEN

    batch, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    grouped = (query * scaling).reshape(batch, kv_heads, heads // kv_heads * queries, dim)
    past_key, past_value = specdec_past[module.layer_idx]
    scores = torch.cat([grouped @ k.transpose(-1, -2) for k in (past_key, key)], dim=-1).float()
    scores = scores.view(batch, kv_heads, heads // kv_heads, queries, -1)
    scores = torch.where(attention_mask[:, :, None], scores, torch.full((), HIDDEN))
    probs = scores.softmax(dim=-1).view(batch, kv_heads, heads // kv_heads * queries, -1)
    out = probs[..., : past_key.shape[2]] @ past_value + probs[..., past_key.shape[2] :] @ value
    return out.view(batch, heads, queries, dim).transpose(1, 2).contiguous(), None


def test_mask_bias_made_once_gives_the_where_form_to_the_bit(exports, tmp_path):
    """Format 6 turns the bool mask into a float bias once per forward and adds it to each layer's
    scores; format 5 applied the bool mask by a Where in every layer. Same logits to the bit, one
    Where in all against one per layer, and the format-5 export still loads. (Every architecture's
    format-6 export is checked against PyTorch in test_export_matches_pytorch_at_unseen_sizes.)"""
    from unittest import mock

    import onnx
    from transformers import AttentionInterface

    from specdec import attention
    from specdec.export.onnx import _random_tree, graph_logits
    from specdec.export.onnx_graph import KVShape

    source, folder = exports["llama"]
    AttentionInterface.register(attention.NAME, _where_attention)
    try:
        with mock.patch.object(attention, "mask_bias", lambda mask: mask):
            old = export_onnx(str(source), tmp_path / "v5")
    finally:
        AttentionInterface.register(attention.NAME, attention.tree_attention)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["format_version"] = 5
    (old / MANIFEST).write_text(json.dumps(manifest))
    layers = manifest["layers"]
    wheres = {f: sum(n.op_type == "Where" for n in onnx.load(str(f / "model.onnx")).graph.node) for f in (folder, old)}
    assert wheres[old] - wheres[folder] == layers - 1  # a Where per layer, against one making the bias
    new, plain = (OnnxRuntimeBackend.load(str(f), OnnxRuntimeOptions()) for f in (folder, old))
    shape, gen = KVShape(layers, manifest["kv_heads"], manifest["head_dim"]), torch.Generator().manual_seed(2)
    for query, past, unused in ((1, 9, 2), (7, 4, 0), (13, 30, 5)):
        inputs = _random_tree(shape, manifest["vocab_size"], torch.float32, query, past, unused, gen)
        assert torch.equal(graph_logits(new, *inputs), graph_logits(plain, *inputs))


def test_gpt2_has_no_sibling_projections(exports):
    """GPT-2's c_attn already projects q, k and v at once, and its MLP has one input projection."""
    assert read_manifest(exports["gpt2"][1])["fused_matmuls"] == 0


@pytest.mark.parametrize("version", [3, 2])
def test_exports_of_older_formats_still_load_and_decode(format3, models, tmp_path, version):
    """Format 3 returns every position's logits; format 2 is format 3 without the features output
    (its manifest names no feature layers)."""
    folder = tmp_path / f"v{version}"
    shutil.copytree(format3, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["feature_layers"] == [] and manifest["outputs"][-1] != "features"  # 2 layers: no EAGLE-3 defaults
    assert manifest["format_version"] == 3 and "logit_positions" not in manifest["inputs"]
    if version == 2:
        manifest["format_version"] = 2
        del manifest["feature_layers"], manifest["hidden_size"]
        (folder / MANIFEST).write_text(json.dumps(manifest))
    target = OnnxRuntimeBackend.load(str(folder), OnnxRuntimeOptions())
    ar = get_strategy("ar").cls
    decoder = SpeculativeDecoder(target, None, ar(ar.Options()), GenerationOptions())
    assert decoder.generate(PROMPT, max_new_tokens=20).token_ids == hf_greedy(models("llama", 0), PROMPT, 20)
    assert check_export(folder)["ok"]
    with pytest.raises(SpecdecError, match=f"has no features output \\(format {version}"):
        target.request_features((0, 1))


def test_an_architecture_without_position_ids_is_refused(tmp_path):
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "bloom")
    with pytest.raises(SpecdecError, match="BloomForCausalLM cannot take a tree attention mask"):
        export_onnx(str(tmp_path / "bloom"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_non_empty_output_folder_is_refused(exports, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(SpecdecError, match="is not empty"):
        export_onnx(str(exports["llama"][0]), tmp_path / "busy")


@pytest.mark.parametrize("provider", ["CUDAExecutionProvider", "TensorrtExecutionProvider"])
def test_a_missing_gpu_provider_names_the_package_to_install(provider, exports):
    import onnxruntime

    if provider in onnxruntime.get_available_providers():
        pytest.skip(f"onnxruntime-gpu is installed here: {provider} is not missing")
    with pytest.raises(SpecdecError, match=rf"onnxruntime has no {provider} \(pip install 'specdec\[onnx-gpu\]'"):
        create_session(exports["llama"][1], [provider, "CPUExecutionProvider"], intra_op_threads=0)


def test_device_cuda_without_a_cuda_torch_is_one_line(exports, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SpecdecError, match=r"device 'cuda' needs a CUDA GPU.*use device: cpu"):
        OnnxRuntimeBackend.load(str(exports["llama"][1]), OnnxRuntimeOptions(device="cuda"))


def test_feature_layers_the_model_lacks_are_one_line(exports, tmp_path):
    source, _ = exports["llama"]
    with pytest.raises(SpecdecError, match=r"features of decoder layer 7 were asked for, but the model has 2 layers \(0 \.\. 1\)"):
        export_onnx(str(source), tmp_path / "out", feature_layers=(0, 7))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("spinning", [True, False])
def test_threads_stop_spinning_when_a_forward_returns(spinning, exports):
    """Spinning (the default) holds between a forward's operators only: a PyTorch draft run
    between forwards gets the cores (BENCHMARKS.md: a chain's draft beside threads spinning on
    after the run read 19.9 tok/s against 29.2 with them stopped)."""
    backend = OnnxRuntimeBackend.load(str(exports["llama"][1]), OnnxRuntimeOptions(allow_spinning=spinning))
    options = backend.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert OnnxRuntimeOptions().allow_spinning is True
