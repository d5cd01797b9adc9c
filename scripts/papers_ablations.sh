#!/usr/bin/env bash
# Issue 20 ablations: GSD over k, tau, theta_prob, theta_sib and merging; DySpec greedy expansion,
# static_tree and the threshold variant at equal node budgets. One bench run each, one after another.
# Usage: [RUNS="gsd-merge budgets"] scripts/papers_ablations.sh PAIR...
#   PAIR: draft, eagle3, demo; RUNS: a subset of the runs below (default all); results in out/papers/PAIR-RUN
set -euo pipefail
C=benchmarks/configs/papers
RUNS=${RUNS:-gsd-k gsd-tau gsd-prob gsd-sib gsd-merge budgets threshold}
for pair in "$@"; do
  if [ "$pair" = demo ]; then P=(--prompts benchmarks/prompts/code.jsonl --limit 12); else P=(--chat --prompts benchmarks/prompts/chat-12.jsonl); fi
  for name in $RUNS; do
    case $name in
      gsd-k) args=($C/gsd-$pair.yaml -o 'strategy.max_out_degree=[2,4,8]') ;;
      gsd-tau) args=($C/gsd-$pair.yaml -o 'strategy.redundancy_threshold=[0,1,2,3]') ;;
      gsd-prob) args=($C/gsd-$pair.yaml -o 'strategy.prob_threshold=[0.1,0.2,0.4]') ;;
      gsd-sib) args=($C/gsd-$pair.yaml -o 'strategy.sibling_threshold=[0.1,0.3,0.5]') ;;
      gsd-merge) args=($C/gsd-$pair.yaml -o 'strategy.merge=[true,false]') ;;
      budgets) args=($C/dyspec-$pair.yaml $C/static_tree-$pair.yaml -o 'strategy.max_nodes=[8,16,28]'
                     -o 'strategy.branching=[[2,1,1,1],[4,1,1,1],[4,2,1,1]]') ;;
      threshold) args=($C/dyspec-$pair.yaml -o strategy.mode=threshold -o strategy.max_nodes=28 -o 'strategy.threshold=[0.3,0.1,0.03]') ;;
      *) echo "unknown run $name" >&2; exit 2 ;;
    esac
    specdec bench "${args[@]}" "${P[@]}" --baselines ar --repeats 1 --max-new-tokens 64 --out "out/papers/$pair-$name"
  done
done
