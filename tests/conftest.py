import functools
import os
import shutil
from pathlib import Path

# Hermetic: no test reaches a model hub. Set before huggingface_hub is imported, so a hub id that
# is not cached fails at once instead of after the connection attempts time out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from tiny_models import perturbed_copy, tiny_model


@functools.lru_cache(maxsize=None)
def cached_model(arch: str, seed: int):
    return tiny_model(arch, seed)


@functools.lru_cache(maxsize=None)
def cached_draft(arch: str, kind: str):
    """The drafts the invariants are checked with: "same" (everything accepted), "random"
    (almost nothing accepted) and "perturbed" (partial acceptance)."""
    target = cached_model(arch, 0)
    return {"same": lambda: target, "random": lambda: cached_model(arch, 1),
            "perturbed": lambda: perturbed_copy(target, 0.03, seed=2)}[kind]()


def _cuda_missing() -> bool:
    import torch

    return not torch.cuda.is_available()


def _tensorrt_missing() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # ImportError, or a CUDA library it loads is missing
        return True
    return False


NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False)"
NO_TENSORRT = "needs TensorRT (import tensorrt failed; pip install 'specdec[tensorrt]', see docs/gpu.md)"
# marker -> what it needs, each as (missing?, reason), checked in order; TensorRT also needs a GPU
REQUIREMENTS = {"gpu": [(_cuda_missing, NO_CUDA)], "tensorrt": [(_tensorrt_missing, NO_TENSORRT), (_cuda_missing, NO_CUDA)]}


def pytest_configure(config):
    """In a pytest-xdist worker (`pytest -n auto`), one torch thread: the workers already share the
    cores, and two workers' OpenMP pools spinning on two cores ran the suite slower than one process."""
    if hasattr(config, "workerinput"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` and `tensorrt` tests, with the reason, where this machine cannot run them."""
    missing = functools.cache(lambda check: check())  # each check at most once, only if a test needs it
    for item in items:
        for marker, needs in REQUIREMENTS.items():
            if item.get_closest_marker(marker) is None:
                continue
            reason = next((why for check, why in needs if missing(check)), None)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
                break


@pytest.fixture
def drafts():
    return cached_draft


@pytest.fixture
def models():
    """models(arch, seed) -> a cached tiny model (do not mutate it)."""
    return cached_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny target / draft / other-vocabulary draft saved as Hugging Face model folders."""
    from tiny_models import tiny_model

    root = tmp_path_factory.mktemp("models")
    cached_model("llama", 0).save_pretrained(root / "target")
    cached_model("llama", 1).save_pretrained(root / "draft")
    tiny_model("llama", 1, vocab=80).save_pretrained(root / "other_vocab")
    return root


@pytest.fixture
def write_config(tmp_path, model_dirs):
    """write_config(**sections) -> path of a YAML config over the saved tiny models."""
    import yaml

    def write(**sections):
        data = {
            "target": {"model": str(model_dirs / "target")},
            "draft": {"model": str(model_dirs / "draft")},
            "strategy": {"name": "chain", "k": 3},
            "generation": {"max_new_tokens": 20},
        }
        for name, value in sections.items():
            data[name] = value
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@pytest.fixture(scope="session")
def repo_mirror(tmp_path_factory):
    """A scratch copy of the repository's configs beside its shipped demo model pair, for running
    the documented commands without writing into the checkout."""
    repo = Path(__file__).resolve().parents[1]
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(repo / "configs", root / "configs")
    (root / "models").mkdir()
    (root / "models" / "demo").symlink_to(repo / "models" / "demo")
    return root


@pytest.fixture(autouse=True, scope="session")
def hermetic_cache(tmp_path_factory):
    """What specdec builds on first use (exports, calibrations, GGUF conversions) goes to a scratch
    cache of this test session, never the user's, nor another pytest-xdist worker's."""
    os.environ["SPECDEC_CACHE_DIR"] = str(tmp_path_factory.mktemp("specdec-cache"))


@pytest.fixture(autouse=True, scope="session")
def hermetic_plugins():
    """No installed third-party plugin loads unless a test asks for it (tests that do unset or
    change SPECDEC_LOAD_PLUGINS and reload the plugins)."""
    import os

    from specdec.plugins import reload_plugins

    os.environ["SPECDEC_LOAD_PLUGINS"] = ""
    reload_plugins()
    yield


@pytest.fixture(scope="session")
def onnx_export(tmp_path_factory, worker_id):
    """onnx_export(name, build, **options) -> the ONNX export of the model `build()` returns (a
    tiny model, which `name` names), made by `export_onnx(..., **options)` once per test run: every
    test and every pytest-xdist worker asking for the same name and options gets the same folder
    (an export of a tiny model takes 10 to 40 s). The source model is saved at `folder.parent /
    "src"`. Read-only: copy an export before changing it."""
    # the run's own folder, shared by its workers (their base folders are inside it); a lock per
    # model, so that a worker waits for an export another is making instead of making it again
    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    root = root / "onnx-exports"
    root.mkdir(exist_ok=True)

    def export(name: str, build, **options) -> Path:
        from filelock import FileLock

        from specdec.export.onnx import export_onnx

        key = ",".join(f"{k}={v}" for k, v in sorted(options.items())) or "default"
        folder = root / name / key.replace("/", "_").replace(" ", "")
        with FileLock(str(root / f"{name}.lock")):
            if not folder.is_dir():
                source = root / name / "src"
                if not source.is_dir():
                    build().save_pretrained(source)
                export_onnx(str(source), folder, **options)
        return folder

    return export
