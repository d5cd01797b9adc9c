"""Fusing sibling projections in a saved ONNX graph (specdec/export/rewrite.py), on small graphs
built here: which MatMuls fuse, exact outputs, both Split forms, and weights in external data."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="needs the [onnx] extra (onnx, onnxscript, onnxruntime)")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from specdec.export.rewrite import fuse_sibling_matmuls, load_graph, save_graph  # noqa: E402


def projections(opset: int = 18, width: int = 8) -> onnx.ModelProto:
    """x [M, width] -> q, k, v (siblings), u = q @ U (another activation, alone) and t = x @ E^T (a
    computed weight, as an output projection tied to the embedding: not fused); all are outputs."""
    rng = np.random.default_rng(0)
    weights = {"Wq": (width, 6), "Wk": (width, 4), "Wv": (width, 4), "U": (6, 5), "E": (3, width)}
    initializers = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in weights.items()]
    nodes = [helper.make_node("MatMul", ["x", w], [y], name=f"mm_{y}") for y, w in (("q", "Wq"), ("k", "Wk"), ("v", "Wv"))]
    nodes += [helper.make_node("MatMul", ["q", "U"], ["u"]), helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
              helper.make_node("MatMul", ["x", "Et"], ["t"])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["M", None]) for n in ("q", "k", "v", "u", "t")]
    graph = helper.make_graph(nodes, "projections", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", width])],
                              outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


@pytest.mark.parametrize("opset", [18, 11])  # Split's sizes: an input from opset 13, an attribute before
def test_only_constant_products_of_one_activation_fuse_and_their_outputs_are_exact(opset):
    model = projections(opset)
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    expected = run(model, x)
    assert fuse_sibling_matmuls(model) == 2  # q, k, v -> one MatMul; u and t stay
    onnx.checker.check_model(model)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 3 and [n.op_type for n in model.graph.node].count("Split") == 1
    assert {t.name for t in model.graph.initializer} & {"Wq", "Wk", "Wv"} == set()  # the old weights are gone
    for got, want in zip(run(model, x), expected):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_a_graph_without_siblings_is_left_alone():
    model = projections()
    for name in ("k", "v"):  # q's product alone reads x with a constant weight
        model.graph.node.remove(next(n for n in model.graph.node if n.output[0] == name))
        model.graph.output.remove(next(o for o in model.graph.output if o.name == name))
    before = model.SerializeToString()
    assert fuse_sibling_matmuls(model) == 0 and model.SerializeToString() == before


def test_weights_in_external_data_are_rewritten_into_one_new_file(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(projections(width=256), str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    x = np.random.default_rng(2).standard_normal((3, 256)).astype(np.float32)
    expected = run(onnx.load(str(path)), x)
    model, external = load_graph(path)
    assert external and fuse_sibling_matmuls(model) == 2
    save_graph(model, path, external)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert all(np.array_equal(a, b) for a, b in zip(session.run(None, {"x": x}), expected))
    assert load_graph(path)[1]  # still external
