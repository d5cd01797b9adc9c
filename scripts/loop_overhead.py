"""The loop's own cost per step (no model time: table models), this checkout's specdec/decode.py
against the one at a git revision, interleaved; the medians are printed.

    python scripts/loop_overhead.py e7ff857
"""

import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from specdec import decode as current
from specdec.plugins import get_strategy
from specdec.sampling import Random, Warp
from specdec.stopping import Stopper
from specdec.testing import TableBackend, random_table


def load_revision(revision: str):
    source = subprocess.run(["git", "show", f"{revision}:specdec/decode.py"], capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "decode_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("decode_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_step(module, target, draft) -> tuple[float, list[int]]:
    strategy = get_strategy("chain").cls(get_strategy("chain").cls.Options(k=3))
    start = time.perf_counter()
    out, metrics = module.speculative_decode(TableBackend(target, 50), TableBackend(draft, 50), strategy, [1, 2, 3],
                                             Warp(), Stopper(400), Random(0))
    return (time.perf_counter() - start) / metrics.steps, out


def main() -> None:
    torch.set_num_threads(1)
    before = load_revision(sys.argv[1] if len(sys.argv) > 1 else "HEAD")
    target, draft = random_table(101, 50), random_table(202, 50)
    times: dict[str, list[float]] = {"revision": [], "checkout": []}
    for _ in range(15):
        for name, module in (("revision", before), ("checkout", current)):
            seconds, out = per_step(module, target, draft)
            times[name].append(seconds)
    assert per_step(before, target, draft)[1] == per_step(current, target, draft)[1], "the two loops emit different tokens"
    for name, values in times.items():
        print(f"{name}: {sorted(values)[len(values) // 2] * 1e6:.0f} us per step (median of {len(values)})")


if __name__ == "__main__":
    main()
