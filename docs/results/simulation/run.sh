#!/usr/bin/env bash
# The simulation study of docs/results/simulation/report.md, exactly as run (2026-11-22).
# From the repository root:  bash docs/results/simulation/run.sh      (10-20 minutes on 2 shared cores)
set -euo pipefail
OUT=docs/results/simulation
MOEBAL=${MOEBAL:-"python -m moebal"}
# The paper's cluster: 32 GPUs = 4 nodes x 8, EP 4, scheduling group 8 (two EP groups).
# Our choices: Mixtral-8x7B-shaped experts (D 4096, F 14336, top-2), 4096 tokens per GPU per
# micro-batch, H100 defaults, forward + backward, 1 ms of scheduling per layer (the paper's
# reported bound), 20 timed steps x 2 MoE layers after 10 warm-up steps.
PAPER="--gpus 32 --gpus-per-node 8 --ep 4 --sched-group 8 --top-k 2
       --d-model 4096 --ffn-hidden 14336 --seq-len 4096 --tokens-per-gpu 4096 --hardware h100
       --steps 20 --layers 2 --rebalance-every 10 --sched-time-ms 1 --no-progress"

# 1. skew grids: 8 experts (Mixtral itself) and 64 experts; MoE layers only, then with attention
for E in 8 64; do
  for x in 0.2 0.4 0.6 0.8 1.0; do
    $MOEBAL simulate $PAPER --experts $E --synthetic zipf --exponent $x --no-plots \
      --out $OUT/e$E-zipf-$x --json > /dev/null
    $MOEBAL simulate $PAPER --experts $E --synthetic zipf --exponent $x --include-attention --no-plots \
      --out $OUT/e$E-zipf-$x-attn --json > /dev/null
  done
done
# 2. the main configuration with plots, and skew that moves
$MOEBAL simulate $PAPER --experts 8 --synthetic zipf --exponent 0.6 --out $OUT/main
$MOEBAL simulate $PAPER --experts 8 --synthetic drift --exponent 0.6 --drift 1 --out $OUT/drift
$MOEBAL simulate $PAPER --experts 64 --synthetic burst --exponent 0.4 --hot-experts 4 --hot-factor 8 \
  --no-plots --out $OUT/burst
# 3. the scheduler's solve time measured on this CPU instead of 1 ms
$MOEBAL simulate ${PAPER/--sched-time-ms 1/} --experts 8 --synthetic zipf --exponent 0.6 --no-plots \
  --out $OUT/measured-sched
$MOEBAL simulate ${PAPER/--sched-time-ms 1/} --experts 64 --synthetic zipf --exponent 0.6 --no-plots \
  --out $OUT/measured-sched-e64
# 4. fine-grained experts (DeepSeekMoE-16B-like shapes: 64 experts, D 2048, F 1408, top-6)
$MOEBAL simulate ${PAPER/--ffn-hidden 14336/--ffn-hidden 1408} --experts 64 --d-model 2048 --top-k 6 \
  --synthetic zipf --exponent 0.6 --no-plots --out $OUT/fine-grained
# 5. GPU and expert counts (3 timed steps x 1 layer each)
$MOEBAL simulate --sweep --synthetic zipf --exponent 0.6 --sched-time-ms 1 --no-progress --out $OUT/sweep
# 6. routing traces of our own training runs (tiny preset, 80 steps, 8 data-parallel shards), one
#    per balancer; recorded with (model branch ca9d162 + routing branch 21fb9a4 balancers):
#      moebal train --preset tiny --balancer B --steps 80 --trace --out runs/tiny-B
#    (each run folder's trace.npz and config.json copied to $OUT/traces/tiny-B/)
T=$OUT/traces
TRACES="$T/tiny-none/trace.npz $T/tiny-aux_loss/trace.npz $T/tiny-loss_free/trace.npz"
#    each GPU's micro-batch = one recorded 128-token sequence, rescaled to 4096 tokens
$MOEBAL simulate $PAPER --trace $TRACES --out $OUT/traces-sim
$MOEBAL simulate $PAPER --trace $TRACES --include-attention --no-plots --out $OUT/traces-sim-attn
#    each GPU's micro-batch = 4 recorded sequences pooled (fewer steps: re-place every 2)
$MOEBAL simulate ${PAPER/--rebalance-every 10/--rebalance-every 2} --trace $TRACES --trace-pool 4 \
  --no-plots --out $OUT/traces-sim-pool4
