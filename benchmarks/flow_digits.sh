#!/usr/bin/env bash
# The flow-matching digits model (ctrl:digits-flow) gains the label control, beside the DDPM model: DirectBackprop
# and GRPO on the flow model and GRPO on the DDPM (the DDPM's DirectBackprop is the main job, benchmarks/main_job/),
# each over 3 training seeds, gamma chosen on validation seeds, reported on test seeds, with step-count robustness
# (trained at 10 steps, tested at 5 and 20). 2 cores, torch threads pinned to 1 (the other core ran the test suite).
#   bash benchmarks/flow_digits.sh
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for config in ${CONFIGS:-flow_control flow_grpo grpo}; do
  /usr/bin/time -f "$config: %e s wall" python benchmarks/main_job.py --config configs/digits/$config.yaml \
    --seeds 0 1 2 --gammas 0.9 1.0 1.1 --steps 5 20 --threads 1 --output benchmarks/flow_digits/$config
done
