"""Device options: a malformed device string is a one-line config error naming the key; a device
this machine lacks is a one-line load error, raised before any weights are read. Runs without a
GPU, and on one (CUDA's presence is faked either way)."""

import pytest
import torch
from pydantic import ValidationError

import specdec
import specdec.backends.pytorch
from specdec.backends.pytorch import PyTorchBackend, PyTorchOptions
from specdec.devices import parse_device, resolve_device
from specdec.errors import SpecdecError
from test_cli import run_cli

FORMS = "expected cpu, cuda or cuda:N"


@pytest.mark.parametrize("value, parsed", [("cpu", "cpu"), ("cuda", "cuda"), ("CUDA:1", "cuda:1"), (" cuda:0 ", "cuda:0")])
def test_parse_device_accepts_cpu_cuda_and_cuda_n(value, parsed):
    assert parse_device(value) == parsed
    assert PyTorchOptions(device=value).device == parsed


@pytest.mark.parametrize("value", ["gpu0", "cuda:x", "cuda:", "cuda:-1", "mps", ""])
def test_parse_device_refuses_other_strings(value):
    with pytest.raises(ValueError, match=FORMS):
        parse_device(value)
    with pytest.raises(ValidationError, match=FORMS):
        PyTorchOptions(device=value)


@pytest.fixture
def gpus(monkeypatch):
    """gpus(n): make this machine look as if it had n CUDA devices (0: a PyTorch build without CUDA)."""

    def fake(count: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.version, "cuda", "12.8" if count else None)

    return fake


@pytest.fixture
def no_weights(monkeypatch):
    """Reading weights fails the test: device errors must come first."""

    class Refuse:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise AssertionError("weights were loaded before the device was checked")

    monkeypatch.setattr(specdec.backends.pytorch, "AutoModelForCausalLM", Refuse)


def test_resolve_device(gpus):
    gpus(2)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(SpecdecError, match=r"device 'cuda:2' does not exist: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("count, why", [(0, "this PyTorch build has no CUDA"), (-1, "no CUDA GPU is visible")])
def test_resolve_device_without_cuda_says_why(gpus, monkeypatch, count, why):
    gpus(0)
    if count < 0:  # a CUDA build of PyTorch on a machine whose GPU is not visible
        monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SpecdecError, match=why) as info:
        resolve_device("cuda")
    assert "\n" not in str(info.value) and "use device: cpu" in str(info.value)


@pytest.mark.parametrize("option", ["target.device=gpu0", "target.device=cuda:x", "draft.device=tpu"])
def test_malformed_device_is_one_config_line_naming_the_key(capsys, write_config, option):
    code, out, err = run_cli(capsys, "run", str(write_config()), "--prompt-ids", "1,2", "-o", option)
    key = option.split("=")[0]
    assert code != 0 and out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: ") and f"{key}: " in err and FORMS in err, err


def test_cuda_without_cuda_is_one_line_before_loading(capsys, write_config, gpus, no_weights):
    gpus(0)
    code, out, err = run_cli(capsys, "run", str(write_config()), "--prompt-ids", "1,2", "-o", "target.device=cuda")
    assert code != 0 and out == "" and err.count("\n") == 1, err
    assert "device 'cuda' needs a CUDA GPU" in err and "use device: cpu" in err
    config = specdec.load_config(write_config(), overrides=["draft.device=cuda", "target.device=cpu"])
    with pytest.raises(SpecdecError, match=r"CUDA.*device: cpu") as info:  # the Python API, and a draft
        specdec.SpeculativeDecoder.from_config(config, target=object.__new__(PyTorchBackend))  # not loaded
    assert "\n" not in str(info.value)


def test_a_missing_gpu_index_names_how_many_exist(model_dirs, gpus, no_weights):
    gpus(2)
    with pytest.raises(SpecdecError, match=r"device 'cuda:7' does not exist: this machine has 2 CUDA device\(s\)") as info:
        PyTorchBackend.load(str(model_dirs / "target"), PyTorchOptions(device="cuda:7"))
    assert "\n" not in str(info.value)


def test_device_map_skips_the_check_only_for_the_default_device(model_dirs, gpus, no_weights):
    gpus(0)
    with pytest.raises(SpecdecError, match="needs a CUDA GPU"):
        PyTorchBackend.load(str(model_dirs / "target"), PyTorchOptions(device_map="auto", device="cuda"))
    with pytest.raises(AssertionError, match="weights were loaded"):  # got as far as the weights
        PyTorchBackend.load(str(model_dirs / "target"), PyTorchOptions(device_map="auto"))
