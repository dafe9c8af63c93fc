#!/usr/bin/env bash
# MAT (mean accepted tokens per target forward) of lookahead under sampling (SJD): 3 chat prompts x 9 seeds,
# temperature 0.8, top-p 0.95, draft length 4, 128 tokens each, one `specula run --json` per run. Prints the mean
# of the runs' MAT and the pooled figure (all tokens over all target forwards). MAT is deterministic for a seed,
# so the figure does not depend on the machine's load; wall-clock times are ignored.
# Usage: scripts/sjd_mat.sh [SPECULA_BINARY]   (default target/release/specula; needs jq)
#        SEEDS="$(seq 0 26)" scripts/sjd_mat.sh    (more seeds: runs differ by more than most changes do)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/specula}
prompts=("Explain how a bicycle works." "Write a short poem about the sea." "Tell me about the history of Rome.")
for prompt in "${prompts[@]}"; do
  for seed in ${SEEDS:-0 1 2 3 4 5 6 7 8}; do
    "$bin" run --chat --prompt "$prompt" --max-tokens 128 --method speculative --drafter lookahead \
      --temperature 0.8 --top-p 0.95 --seed "$seed" --json | tail -n 1
  done
done | jq -rs '
  "runs \(length); MAT mean of runs \((map(.mean_accepted_tokens) | add / length) * 1000 | round / 1000); " +
  "pooled \((map(.generated_tokens) | add) / (map(.target_forward_calls) | add) * 1000 | round / 1000) " +
  "(\(map(.generated_tokens) | add) tokens in \(map(.target_forward_calls) | add) target forwards)"'
