#!/usr/bin/env bash
# Issue 20 ablations: GSD over k, tau, theta_prob, theta_sib and merging; DySpec greedy expansion,
# static_tree and the threshold variant at equal node budgets. One bench run each, one after another.
# Usage: scripts/papers_ablations.sh PAIR...   (PAIR: draft, eagle3, demo; results in out/papers/PAIR-*)
set -euo pipefail
C=benchmarks/configs/papers
for pair in "$@"; do
  if [ "$pair" = demo ]; then P=(--prompts benchmarks/prompts/code.jsonl --limit 12); else P=(--chat --prompts benchmarks/prompts/chat-12.jsonl); fi
  run() { local name=$1; shift; specdec bench "$@" "${P[@]}" --baselines ar --repeats 1 --max-new-tokens 64 --out "out/papers/$pair-$name"; }
  run gsd-k $C/gsd-$pair.yaml -o 'strategy.max_out_degree=[2,4,8]'
  run gsd-tau $C/gsd-$pair.yaml -o 'strategy.redundancy_threshold=[0,1,2,3]'
  run gsd-prob $C/gsd-$pair.yaml -o 'strategy.prob_threshold=[0.1,0.2,0.4]'
  run gsd-sib $C/gsd-$pair.yaml -o 'strategy.sibling_threshold=[0.1,0.3,0.5]'
  run gsd-merge $C/gsd-$pair.yaml -o 'strategy.merge=[true,false]'
  run budgets $C/dyspec-$pair.yaml $C/static_tree-$pair.yaml -o 'strategy.max_nodes=[8,16,28]' \
    -o 'strategy.branching=[[2,1,1,1],[4,1,1,1],[4,2,1,1]]'
  run threshold $C/dyspec-$pair.yaml -o strategy.mode=threshold -o strategy.max_nodes=28 -o 'strategy.threshold=[0.3,0.1,0.03]'
done
