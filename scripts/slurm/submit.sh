#!/bin/bash
# sbatch with the job's log in logs/slurm/<job name>-<job id>.out. SLURM opens --output before the job's script
# runs, so the folder must exist at submission: this wrapper makes it, then submits from the repository root.
#   scripts/slurm/submit.sh scripts/slurm/train_dpo.sbatch dpo.beta=0.1
#   scripts/slurm/submit.sh --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 scripts/slurm/train_dpo.sbatch \
#       trainer=ddp trainer.devices=4 trainer.num_nodes=2
# Arguments before the script are sbatch options, after it Hydra overrides. SBATCH=<command> replaces sbatch.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p logs/slurm
exec ${SBATCH:-sbatch} --output=logs/slurm/%x-%j.out "$@"
