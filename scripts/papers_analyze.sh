#!/usr/bin/env bash
# Issue 20, after the ablations: GSD and DySpec against standard speculative decoding (a chain),
# and `specdec analyze` for the papers' measures. Usage: scripts/papers_analyze.sh PAIR...
set -euo pipefail
C=benchmarks/configs/papers
for pair in "$@"; do
  if [ "$pair" = demo ]; then P=(--prompts benchmarks/prompts/code.jsonl --limit 12); else P=(--chat --prompts benchmarks/prompts/chat-12.jsonl); fi
  specdec bench $C/chain-$pair.yaml $C/gsd-$pair.yaml $C/dyspec-$pair.yaml -o 'strategy.k=[2,4]' "${P[@]}" \
    --baselines ar --repeats 1 --max-new-tokens 64 --out "out/papers/$pair-vs-chain"
  specdec analyze $C/gsd-$pair.yaml -o 'strategy.max_out_degree=[2,4,8]' --temperatures 0 "${P[@]}" \
    --max-new-tokens 64 --out "out/papers/$pair-analyze-gsd"
  specdec analyze $C/dyspec-$pair.yaml --temperatures 0,0.6 "${P[@]}" --max-new-tokens 64 --out "out/papers/$pair-analyze-dyspec"
done
