#!/usr/bin/env bash
# Step-count robustness (issue 3): PPO and ContinuousTimePG trained at 50 sampling steps on digits,
# each evaluated at 50, 25 and 100 steps with the same seeds. 2 cores, torch threads pinned to 2.
#   bash benchmarks/step_robustness.sh [rollouts]      (default 150 rollouts of 32 chains)
set -euo pipefail
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
rollouts=${1:-150}
for algo in ppo continuous; do
  /usr/bin/time -f "$algo: %e s wall" ctrl fit --config configs/digits/$algo.yaml \
    --model.num_steps 50 --model.eval_num_steps '[50, 25, 100]' \
    --model.algorithm.init_args.timestep_fraction 0.2 \
    --data.batches_per_epoch "$rollouts" \
    --trainer.default_root_dir runs/steps50-$algo \
    --trainer.callbacks.path runs/steps50-$algo/samples.png
done
