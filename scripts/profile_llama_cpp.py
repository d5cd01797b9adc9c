"""t(Q) of plain llama.cpp on a GGUF file, measured the way `specdec profile` measures specdec's
backends: one forward of Q new tokens over C cached entries, every position's logits returned, the
median of repeats. Needs llama-cpp-python (pip install 'specdec[llamacpp]').

    python scripts/profile_llama_cpp.py MODEL.gguf [--queries 1,2,4,8,16,32] [--contexts 256,1024]
        [--threads N] [--repeats 7]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--queries", default="1,2,4,8,16,32")
    parser.add_argument("--contexts", default="256,1024")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's thread count, as specdec uses")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    try:
        from llama_cpp import Llama
    except ImportError:
        print("error: this script needs llama-cpp-python: pip install 'specdec[llamacpp]'", file=sys.stderr)
        return 2
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    queries = [int(q) for q in args.queries.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    llm = Llama(model_path=args.model, n_ctx=max(contexts) + max(queries) + 8, n_batch=max(max(queries), 512),
                n_threads=args.threads, n_threads_batch=args.threads, logits_all=True, verbose=False)
    rng = random.Random(0)
    tokens = [rng.randrange(1000, 20000) for _ in range(max(contexts) + max(queries))]
    print(f"llama.cpp (llama-cpp-python) on {args.model}, {args.threads} threads")
    for context in contexts:
        llm.reset()
        llm.eval(tokens[:context])
        times = []
        for query in queries:
            runs = []
            for _ in range(args.repeats + 1):  # the first is a warm-up
                llm.n_tokens = context  # eval drops the cache entries after n_tokens
                start = time.perf_counter()
                llm.eval(tokens[context : context + query])
                runs.append(time.perf_counter() - start)
            times.append(statistics.median(runs[1:]) * 1e3)
        print(f"  over {context} cached entries:")
        print("    Q          " + "".join(f"{q:>8}" for q in queries))
        print("    t(Q) ms    " + "".join(f"{t:8.1f}" for t in times))
        print("    t(Q)/t(1)  " + "".join(f"{t / times[0]:8.2f}" for t in times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
