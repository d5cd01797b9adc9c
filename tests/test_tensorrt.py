"""TensorRT: the engine's optimization profiles against the exported graph's real inputs, the ONNX
Runtime TensorRT provider options, the CLI's error paths (on CPU), and on a GPU with TensorRT the
engine against PyTorch (marked `tensorrt`)."""

import functools

import pytest

pytest.importorskip("onnxruntime", reason="needs the [onnx] extra (onnx, onnxscript, onnxruntime)")

from test_cli import run_cli  # noqa: E402

from specdec.backends.onnx_contract import profiles, read_manifest  # noqa: E402
from specdec.backends.onnxruntime import tensorrt_provider_options  # noqa: E402
from specdec.errors import SpecdecError  # noqa: E402
from specdec.export.tensorrt import validation_cases  # noqa: E402

MAX_NODES, PREFILL_CHUNK = 16, 32


@pytest.fixture(scope="module")
def export(onnx_export):
    """(source model folder, ONNX export folder) of a tiny Llama (read-only)."""
    from conftest import cached_model

    folder = onnx_export("llama-0", functools.partial(cached_model, "llama", 0))
    return folder.parent / "src", folder


def graph_inputs(folder):
    """name -> dims of the exported graph's inputs (an int for a static dim, None for a dynamic one)."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim] for i in graph.input}


def test_profiles_fit_the_exported_graphs_inputs(export):
    _, folder = export
    manifest, inputs = read_manifest(folder), graph_inputs(folder)
    context = manifest["context"]
    verify, prefill = profiles(MAX_NODES, context, PREFILL_CHUNK)
    for profile in (verify, prefill):
        shapes = profile.shapes(manifest)
        assert set(shapes) == set(inputs)  # every input has a shape, no other name
        for name, sets in shapes.items():
            assert len(sets) == 3
            for shape in sets:
                assert len(shape) == len(inputs[name])
                assert all(want is None or want == got for want, got in zip(inputs[name], shape)), (name, shape)
        for (_, q), (_, _, mq, mc), (_, _, c, _) in zip(shapes["input_ids"], shapes["attention_mask"],
                                                        shapes["past_key_values.0.key"]):
            assert mq == q and mc == c + q  # in min, opt and max alike: the mask's last dim is C + Q
        assert all(s[2] >= 1 for s in shapes["past_key_values.0.key"])  # no zero-length cache
    assert verify.query == (1, 16, MAX_NODES) and verify.capacity[2] == context
    assert prefill.query[2] == PREFILL_CHUNK and prefill.capacity[2] == context
    # a tree forward returns every position's logits; a prefill the last one's (its opt shape)
    assert verify.shapes(manifest)["logit_positions"] == [(1,), (16,), (MAX_NODES,)]
    assert prefill.shapes(manifest)["logit_positions"] == [(1,), (1,), (PREFILL_CHUNK,)]


def test_a_batch_profile_gives_every_input_the_batch_dimension(export):
    """--max-batch B: the verify profile takes 1..B rows on every input, the prefill profile one;
    a forward is matched to a profile by its rows too (TensorRTBackend.execute)."""
    manifest, inputs = read_manifest(export[1]), graph_inputs(export[1])
    verify, prefill = profiles(MAX_NODES, manifest["context"], PREFILL_CHUNK, max_batch=16)
    assert verify.batch == (1, 8, 16) and prefill.batch == (1, 1, 1)
    for profile in (verify, prefill):
        for name, sets in profile.shapes(manifest).items():
            if name == "logit_positions":  # [K]: positions, shared by the rows
                continue
            assert inputs[name][0] is None  # the graph's batch dimension is dynamic
            assert [shape[0] for shape in sets] == list(profile.batch), name
    assert verify.holds(3, 100, batch=16) and not verify.holds(3, 100, batch=17)
    assert not prefill.holds(3, 100, batch=2) and prefill.holds(3, 100)
    with pytest.raises(SpecdecError, match="max_batch must be at least 1"):
        profiles(MAX_NODES, manifest["context"], PREFILL_CHUNK, max_batch=0)


def test_profiles_refuse_sizes_beyond_the_context():
    with pytest.raises(SpecdecError, match="below the context"):
        profiles(64, 64, 32)


def test_validation_cases_are_inside_the_profiles_and_off_their_opt_shapes(export):
    manifest = read_manifest(export[1])
    chosen = profiles(MAX_NODES, manifest["context"], PREFILL_CHUNK)
    opts = {(p.query[1], p.capacity[1]) for p in chosen}
    for query, past, unused in validation_cases(MAX_NODES, manifest["context"], PREFILL_CHUNK):
        assert past + query <= manifest["context"]
        assert any(p.holds(query, past + unused) for p in chosen), (query, past, unused)
        assert (query, past + unused) not in opts


def test_the_tensorrt_execution_provider_gets_every_input_of_every_profile(export):
    manifest = read_manifest(export[1])
    options = tensorrt_provider_options(manifest, MAX_NODES, PREFILL_CHUNK, {"trt_fp16_enable": True})
    assert options["trt_fp16_enable"] is True
    low = options["trt_profile_min_shapes"].split(",")
    assert len(low) == 2 * len(manifest["inputs"])  # two profiles
    high = dict(entry.split(":") for entry in options["trt_profile_max_shapes"].split(",")[: len(manifest["inputs"])])
    context = manifest["context"]
    assert high["input_ids"] == f"1x{MAX_NODES}" and high["attention_mask"] == f"1x1x{MAX_NODES}x{context + MAX_NODES}"
    given = {"trt_profile_min_shapes": "input_ids:1x1"}
    assert tensorrt_provider_options(manifest, MAX_NODES, PREFILL_CHUNK, given) == given  # the user's own win


def test_export_tensorrt_without_tensorrt_is_one_line_and_writes_nothing(capsys, export, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt fails, also where it is installed
    code, out, err = run_cli(capsys, "export", str(export[0]), "--format", "tensorrt", "--out", str(tmp_path / "engine"))
    assert code != 0 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "pip install 'specdec[tensorrt]'" in lines[0]
    assert not list(tmp_path.iterdir())


def test_the_tensorrt_backend_without_tensorrt_is_one_line(capsys, export, write_config, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    config = write_config(target={"model": str(export[1]), "backend": "tensorrt"})
    code, _, err = run_cli(capsys, "run", str(config), "--prompt-ids", "1,2")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "specdec[tensorrt]" in err


def test_bfloat16_onnx_for_onnxruntime_is_refused(capsys, export, tmp_path):
    code, _, err = run_cli(capsys, "export", str(export[0]), "--dtype", "bfloat16", "--out", str(tmp_path / "o"))
    assert code != 0 and "bfloat16 is for --format tensorrt" in err and not (tmp_path / "o").exists()


def test_a_failing_check_says_by_how_much_and_at_which_shape(capsys, export, monkeypatch):
    from specdec.export import onnx

    monkeypatch.setitem(onnx.RELATIVE_TOLERANCE, "float32", 0.0)  # any float noise now fails
    code, _, err = run_cli(capsys, "export", "--check", str(export[1]))
    assert code != 0 and "Traceback" not in err
    assert "worst at query" in err and ", past " in err and "of the largest logit (tolerance 0e+00)" in err


@pytest.mark.tensorrt
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_an_engine_matches_pytorch_and_decodes_greedy_identically(dtype, export, tmp_path, capsys):
    code, out, err = run_cli(capsys, "export", str(export[0]), "--format", "tensorrt", "--dtype", dtype,
                             "--max-nodes", str(MAX_NODES), "--prefill-chunk", str(PREFILL_CHUNK),
                             "--out", str(tmp_path / "engine"), "--validate")
    assert code == 0, err
    assert "greedy choices agree: yes" in out and "greedy speculative decoding on the engine: identical" in out
    assert list((tmp_path / "engine" / "engines").glob("*.plan"))
