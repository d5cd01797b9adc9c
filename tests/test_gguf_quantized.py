"""A GGUF's quantized weights kept quantized in the ONNX export (MatMulNBits over the file's own
blocks): the blocks decode to the file's values, the graph computes the dequantized model, and the
loop stays lossless on it, with float32 and with int8 activations."""

import json
import logging

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="needs the [gguf] extra")
pytest.importorskip("onnxruntime", reason="needs the [onnx] extra (onnx, onnxscript, onnxruntime)")

from helpers import hf_greedy  # noqa: E402
from specdec.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeOptions  # noqa: E402
from specdec.backends.pytorch import PyTorchBackend, PyTorchOptions  # noqa: E402
from specdec.config import GenerationOptions  # noqa: E402
from specdec.decoder import SpeculativeDecoder  # noqa: E402
from specdec.errors import SpecdecError  # noqa: E402
from specdec.export.gguf_weights import decode  # noqa: E402
from specdec.export.nbits import BLOCK  # noqa: E402
from specdec.export.onnx import check_export, export_onnx  # noqa: E402
from specdec.plugins import get_strategy  # noqa: E402
from test_gguf import write_gguf  # noqa: E402
from test_strategies_greedy import STRATEGIES as STRATEGY_SETUPS  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

PROMPT = [3, 17, 42, 8, 60, 5]
STRATEGIES = [("chain", {"k": 3}), ("static_tree", {"branching": [2, 2]}), ("dyspec", {"max_nodes": 8}), ("gsd", {"max_nodes": 12})]
EVERY_STRATEGY = {**STRATEGY_SETUPS, "hybrid": ("hybrid", {"max_nodes": 10})}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_blocks_are_the_files_own_values(qtype):
    """(q - zero point) x scale per block gives what gguf's own dequantization gives, a block of
    equal weights (Q4_1 / Q5_1 store d = 0 there) included."""
    weights = np.random.default_rng(0).standard_normal((6, 4 * BLOCK)).astype(np.float32)
    weights[2, :BLOCK] = 0.5
    raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType[qtype])
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    blocks = decode(qtype, raw, 6)
    q = blocks.q.reshape(6, -1, BLOCK).astype(np.float32)
    minimums = 0 if blocks.minimums is None else blocks.minimums[..., None]
    got = (q - blocks.zero_points.astype(np.float32)[..., None]) * blocks.scales[..., None] + minimums
    np.testing.assert_allclose(got.reshape(6, -1), want, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(want).max())
    assert blocks.q.max() < 2**blocks.bits and blocks.packed().shape == (6, 4, BLOCK * blocks.bits // 8)


@pytest.mark.parametrize("qtype, size, halves, bits, block", [
    ("Q4_K", 144, {0: 0.01, 2: 0.02}, 4, 32), ("Q5_K", 176, {0: 0.01, 2: 0.02}, 8, 32), ("Q6_K", 210, {208: 0.01}, 8, 16),
])
def test_k_quant_blocks_are_the_files_own_values(qtype, size, halves, bits, block):
    """gguf cannot write K-quants, so random bytes stand in for a file's (any bytes are valid
    quants and packed scales; the f16 d / dmin are set): the blocks give what gguf's own
    dequantization gives."""
    raw = np.random.default_rng(2).integers(0, 256, (3, 2, size), dtype=np.uint8)
    for at, value in halves.items():
        raw[..., at : at + 2] = np.array([value], np.float16).view(np.uint8)
    raw = raw.reshape(3, -1)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])  # [3, 512]
    blocks = decode(qtype, raw, 3)
    q = blocks.q.reshape(3, -1, blocks.block).astype(np.float32) - blocks.zero_points[..., None]
    minimums = 0 if blocks.minimums is None else blocks.minimums[..., None]
    got = (q * blocks.scales[..., None] + minimums).reshape(3, -1)
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(want).max())
    assert (blocks.bits, blocks.block) == (bits, block) and blocks.q.max() < 2**bits and want.std() > 0


def test_nibbles_are_repacked_in_matmulnbits_order():
    """ggml keeps weight j and j + 16 in byte j; MatMulNBits wants weights 2i and 2i + 1 in byte i."""
    weights = np.arange(BLOCK, dtype=np.float32)[None].repeat(2, 0) / 4  # q = j exactly in Q4_1... up to d
    raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q4_1)
    blocks = decode("Q4_1", raw, 2)
    packed = blocks.packed()[0, 0]
    assert [int(packed[i] & 0x0F) for i in range(4)] == [int(v) for v in blocks.q[0, 0:8:2]]
    assert [int(packed[i] >> 4) for i in range(4)] == [int(v) for v in blocks.q[0, 1:8:2]]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A tiny Llama written as a Q4_1 GGUF (embedding and output Q8_0), its float32-activation and
    int8-activation exports, and the model transformers dequantizes from the file."""
    root = tmp_path_factory.mktemp("quantized")
    path = write_gguf(root / "tiny-q4_1.gguf", tiny_model("llama", 0), quant="Q4_1")
    dequantized = PyTorchBackend.load(str(path), PyTorchOptions()).model
    exports = {act: export_onnx(str(path), root / f"onnx-{act}", activations=act) for act in ("float32", "int8")}
    return path, exports, dequantized


@pytest.mark.parametrize("qtype, activations, blocks", [
    ("Q4_0", "float32", 14), ("Q4_K", "float32", 14), ("Q8_0", "int8", 15), ("Q5_K", "int8", 15), ("Q6_K", "int8", 15),
])
def test_each_file_type_exports_quantized(qtype, activations, blocks, tmp_path):
    """Q4_0 and Q4_K (K-quants: hidden size 256) with float32 activations: the dequantized model
    within float tolerance. 8-bit blocks (Q8_0; Q5_K; Q6_K, in blocks of 16), which need int8
    activations: close to the dequantized model, decoded by ar."""
    model = tiny_model("llama", 0, hidden=256) if qtype.endswith("_K") else tiny_model("llama", 0)
    path = write_gguf(tmp_path / f"tiny-{qtype}.gguf", model, quant=qtype)
    folder = export_onnx(str(path), tmp_path / "onnx", activations=activations)
    assert sum(json.loads((folder / "specdec_export.json").read_text())["weights"]["quantized"].values()) == blocks
    if activations == "float32":
        result = check_export(folder, str(path))
        assert result["ok"] and result["relative_diff"] < 1e-5
        return
    dequantized = PyTorchBackend.load(str(path), PyTorchOptions()).model(torch.tensor([PROMPT])).logits[0, -1]
    logits = OnnxRuntimeBackend.load(str(folder), OnnxRuntimeOptions()).prefill(torch.tensor([PROMPT]))[0]
    assert float((logits - dequantized).abs().max()) < 0.1 * float(dequantized.abs().max())
    assert len(quantized_decoder(folder, "ar").generate(PROMPT, max_new_tokens=10, ignore_eos=True).token_ids) == 10


def quantized_decoder(folder, name: str, **options) -> SpeculativeDecoder:
    """On the export in `folder`, with the float model the file was written from as the draft: close
    to the target, so drafts are accepted and rejected."""
    target = OnnxRuntimeBackend.load(str(folder), OnnxRuntimeOptions())
    component = get_strategy(name)
    draft = PyTorchBackend(tiny_model("llama", 0)) if component.cls.needs_draft else None
    return SpeculativeDecoder(target, draft, component.cls(component.cls.Options(**options)), GenerationOptions())


@pytest.mark.parametrize("label", list(EVERY_STRATEGY))
def test_every_strategy_is_ar_on_the_quantized_target(label, quantized):
    _, exports, _ = quantized
    name, options = EVERY_STRATEGY[label]
    reference = quantized_decoder(exports["float32"], "ar").generate(PROMPT, max_new_tokens=40, ignore_eos=True).token_ids
    assert quantized_decoder(exports["float32"], name, **options).generate(PROMPT, max_new_tokens=40, ignore_eos=True).token_ids == reference


@pytest.mark.parametrize("name, options", [("chain", {"k": 2}), ("dyspec", {"max_nodes": 3, "max_depth": 2, "expand_per_step": 2})])
def test_sampled_output_has_the_quantized_targets_distribution(name, options, quantized):
    """Every outcome of 3 tokens sampled with top_k 2 through the loop on the quantized target has
    the probability the dequantized model gives it (float32 activations: the same model up to
    summation order), and a proposal recorded wrongly is caught."""
    import math

    from enumeration import enumerate_outcomes
    from specdec.decode import speculative_decode
    from specdec.sampling import Warp
    from specdec.stopping import Stopper
    from test_gpu import target_distribution

    _, exports, dequantized = quantized
    warp, prompt = Warp(1.0, top_k=2), [3, 1, 4]
    decoder = quantized_decoder(exports["float32"], name, **options)

    def generate(rng):
        tokens, _ = speculative_decode(decoder.target, decoder.draft, decoder.strategy, prompt, warp, Stopper(3), rng)
        return tuple(tokens)

    got, want = enumerate_outcomes(generate), target_distribution(dequantized, prompt, 3, warp)
    assert math.isclose(sum(got.values()), 1.0, abs_tol=1e-9)
    assert max(abs(got.get(s, 0.0) - want.get(s, 0.0)) for s in got.keys() | want.keys()) < 1e-5


def test_auto_budgets_calibrate_the_quantized_target_apart(quantized):
    """The cost curve an auto budget plans with is keyed by the backend's options, weights included."""
    from specdec.config import ModelSpec
    from specdec.costs import curve_path

    path, exports, _ = quantized
    backend = OnnxRuntimeBackend.load(str(exports["float32"]), OnnxRuntimeOptions())
    paths = {w: curve_path(ModelSpec(model=str(path), backend="onnxruntime", options=OnnxRuntimeOptions(weights=w)), backend)
             for w in ("auto", "float", "int4")}
    assert len(set(paths.values())) == 3


@pytest.mark.parametrize("activations, kept", [("float32", {"Q8_0": 1}), ("int8", {})])
def test_the_export_keeps_the_files_blocks(activations, kept, quantized):
    """2 layers x 7 Q4_1 linears, and the Q8_0 output: 8-bit blocks only with int8 activations
    (onnxruntime has no float32-activation kernel for them)."""
    import onnx

    _, exports, _ = quantized
    manifest = json.loads((exports[activations] / "specdec_export.json").read_text())
    quantized_types = {"Q4_1": 14, **({} if kept else {"Q8_0": 1})}
    assert manifest["weights"] == {"kind": "gguf", "accuracy": activations, "quantized": quantized_types, "float": kept}
    nodes = onnx.load(str(exports[activations] / "model.onnx"), load_external_data=False).graph.node
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == sum(quantized_types.values())


def test_the_quantized_graph_computes_the_dequantized_model(quantized):
    path, exports, _ = quantized
    result = check_export(exports["float32"], str(path))
    assert result["ok"] and result["greedy_agree"] and result["relative_diff"] < 1e-5


@pytest.mark.parametrize("strategy, options", STRATEGIES)
def test_greedy_output_is_ar_and_the_dequantized_model_on_the_quantized_target(strategy, options, quantized):
    _, exports, dequantized = quantized
    reference = quantized_decoder(exports["float32"], "ar").generate(PROMPT, max_new_tokens=40, ignore_eos=True).token_ids
    out = quantized_decoder(exports["float32"], strategy, **options).generate(PROMPT, max_new_tokens=40, ignore_eos=True)
    assert out.token_ids == reference == hf_greedy(dequantized, PROMPT, 40)


def test_int8_activations_run_ar_and_refuse_speculation_in_one_line(quantized):
    """With int8 activations a token's numbers depend on the other tokens of its forward
    (measured on SmolLM2: docs/export.md), so a verified draft could not be lossless."""
    _, exports, _ = quantized
    assert len(quantized_decoder(exports["int8"], "ar").generate(PROMPT, max_new_tokens=10, ignore_eos=True).token_ids) == 10
    with pytest.raises(SpecdecError) as err:
        quantized_decoder(exports["int8"], "chain", k=3)
    assert "verifying a draft cannot be lossless; run it with strategy ar" in str(err.value) and "\n" not in str(err.value)


def test_int8_activations_change_the_numbers(quantized):
    """The option is real: int8 activations give other logits than the dequantized model's."""
    _, exports, _ = quantized
    logits = {}
    for activations, folder in exports.items():
        backend = OnnxRuntimeBackend.load(str(folder), OnnxRuntimeOptions())
        logits[activations] = backend.prefill(torch.tensor([PROMPT]))
    difference = float((logits["int8"] - logits["float32"]).abs().max())
    assert 1e-4 < difference < 0.2 * float(logits["float32"].abs().max())


def test_a_type_matmulnbits_cannot_express_stays_float_in_one_line(quantized, tmp_path, monkeypatch, caplog):
    import specdec.export.gguf_weights as gguf_weights

    path, _, _ = quantized
    monkeypatch.setattr(gguf_weights, "decode", lambda type_name, raw, rows: None if type_name == "Q8_0" else decode(type_name, raw, rows))
    with caplog.at_level(logging.WARNING, logger="specdec.export.nbits"):
        folder = export_onnx(str(path), tmp_path / "onnx", activations="int8")
    lines = [r.getMessage() for r in caplog.records if r.name == "specdec.export.nbits"]
    assert lines == ["output.weight is Q8_0, which this export does not convert to MatMulNBits: kept as float32 in the graph"]
    assert json.loads((folder / "specdec_export.json").read_text())["weights"]["float"] == {"Q8_0": 1}
    backend = OnnxRuntimeBackend.load(str(folder), OnnxRuntimeOptions())  # the graph runs, the output as a MatMul
    assert backend.prefill(torch.tensor([PROMPT])).shape == (1, 96)


def test_the_onnxruntime_backend_keeps_the_blocks_on_first_use_unless_told(quantized, tmp_path):
    from specdec.config import ModelSpec
    from specdec.decoder import load_backend

    path, _, _ = quantized
    kinds = {}
    for weights in ("auto", "float"):
        backend = load_backend(ModelSpec(model=str(path), backend="onnxruntime", options=OnnxRuntimeOptions(weights=weights)))
        kinds[weights] = backend.manifest["weights"]["kind"]
    assert kinds == {"auto": "gguf", "float": "float"}


@pytest.mark.parametrize("kwargs, message", [
    ({"activations": "int8", "weights": "float"}, "--activations int8 applies to quantized weights"),
    ({"weights": "int8"}, "--weights int8 needs --activations int8"),
    ({"dtype": "float16"}, "quantized weights are kept in float32 exports only"),
])
def test_settings_that_do_not_fit_are_one_line(kwargs, message, quantized, tmp_path):
    path, _, _ = quantized
    with pytest.raises(SpecdecError, match=message):
        export_onnx(str(path), tmp_path / "onnx", **kwargs)
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("bits", [4, 8])
def test_round_to_nearest_blocks_are_within_half_a_step(bits):
    from specdec.export.nbits import round_to_nearest

    weights = np.random.default_rng(1).standard_normal((5, 4 * BLOCK)).astype(np.float32)
    weights[1, :BLOCK] = 0.0  # an all-zero block
    blocks = round_to_nearest(weights, bits)
    q = blocks.q.reshape(5, -1, BLOCK).astype(np.float32)
    got = ((q - blocks.zero_points[..., None]) * blocks.scales[..., None]).reshape(5, -1)
    step = np.repeat(blocks.scales, BLOCK, axis=1)
    assert np.all(np.abs(got - weights) <= step / 2 + 1e-6) and np.all(got[1, :BLOCK] == 0)
    assert blocks.q.max() < 2**bits


@pytest.fixture(scope="module")
def rounded(tmp_path_factory):
    """A tiny float Llama exported with int4 weights (float32 and int8 activations) and int8 weights."""
    root = tmp_path_factory.mktemp("rounded")
    tiny_model("llama", 0).save_pretrained(root / "src")
    settings = {"int4-float32": ("int4", "float32"), "int4-int8": ("int4", "int8"), "int8-int8": ("int8", "int8")}
    return {key: export_onnx(str(root / "src"), root / key, weights=w, activations=a) for key, (w, a) in settings.items()}


@pytest.mark.parametrize("setting", ["int4-float32", "int4-int8", "int8-int8"])
@pytest.mark.parametrize("strategy, options", STRATEGIES[:3:2])
def test_a_float_model_quantized_here_decodes_as_ar_on_the_same_export(setting, strategy, options, rounded, models):
    """--weights int4 / int8 on a float model: every linear becomes MatMulNBits, and the graph is the
    model with its weights rounded per block (float32 activations: exactly, up to summation order,
    and the loop is lossless relative to it; int8 activations: close, ar only)."""
    import onnx

    folder = rounded[setting]
    manifest = json.loads((folder / "specdec_export.json").read_text())
    weights = setting.split("-")[0]
    assert manifest["weights"] == {"kind": weights, "accuracy": setting.split("-")[1], "quantized": {weights: 15}, "float": {}}
    nodes = onnx.load(str(folder / "model.onnx")).graph.node
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == 15

    def decoder(name, **opts):
        target = OnnxRuntimeBackend.load(str(folder), OnnxRuntimeOptions())
        component = get_strategy(name)
        draft = PyTorchBackend(tiny_model("llama", 1)) if component.cls.needs_draft else None
        return SpeculativeDecoder(target, draft, component.cls(component.cls.Options(**opts)), GenerationOptions())

    reference = decoder("ar").generate(PROMPT, max_new_tokens=40, ignore_eos=True).token_ids
    if setting.endswith("float32"):
        assert decoder(strategy, **options).generate(PROMPT, max_new_tokens=40, ignore_eos=True).token_ids == reference
    else:
        with pytest.raises(SpecdecError, match="cannot be lossless"):
            decoder(strategy, **options)
    want = rounded_model(models("llama", 0), int(weights[3:]))(torch.tensor([PROMPT])).logits[0, -1]
    got = OnnxRuntimeBackend.load(str(folder), OnnxRuntimeOptions()).prefill(torch.tensor([PROMPT]))[0]
    difference = float((got - want).abs().max()) / float(want.abs().max())
    assert difference < (1e-5 if setting.endswith("float32") else 0.1)  # int8 activations round inside each product


def rounded_model(model, bits: int):
    """A copy of `model` whose linear weights are rounded per block as the export rounds them."""
    import copy

    from specdec.export.nbits import round_to_nearest

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for module in rounded.modules():
            if isinstance(module, torch.nn.Linear):
                blocks = round_to_nearest(module.weight.numpy(), bits)
                rows = blocks.q.shape[0]
                q = blocks.q.reshape(rows, -1, BLOCK).astype(np.float32) - blocks.zero_points[..., None]
                module.weight.copy_(torch.from_numpy((q * blocks.scales[..., None]).reshape(rows, -1)))
    return rounded
