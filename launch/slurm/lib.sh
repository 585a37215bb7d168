#!/usr/bin/env bash
# Helpers of train.sbatch, kept apart so tests can check the argument assembly without Slurm.

# coordinator_address NODELIST PORT -> "host:port" of the first node of the allocation.
coordinator_address() {
  local first
  if command -v scontrol >/dev/null 2>&1; then
    first=$(scontrol show hostnames "$1" | head -n 1)
  else
    # Without scontrol: expand the first entry of a simple list like "gpu[003-004],gpu010".
    first=$(echo "$1" | sed -E 's/^([^,[]+)\[([0-9]+).*/\1\2/; s/,.*//')
  fi
  echo "${first}:$2"
}

# train_command PYTHON ARGS... -> the shell-quoted trainer command line.
train_command() {
  local python=$1
  shift
  printf '%q ' "$python" -m free_jax.train "$@" | sed 's/ $//'
}
