# Sourced by the cluster job scripts (scripts/abci, scripts/pbs, scripts/slurm) after the venv is active.
#
# MPI_FORWARD: the mpirun -x options that carry the environment to every rank on every node (Open MPI's
# ssh launcher starts remote ranks with the sshd's environment, not the job's): PATH, LD_LIBRARY_PATH and
# PYTHONPATH (the venv, the modules), NCCL_DEBUG (WARN unless set), OMP_NUM_THREADS, and every HOROVOD_*
# and NCCL_* variable the job sets. Only variables that are set are named.
# TRAIN_LIMITS: launcher overrides from MAX_STEPS (train.max_steps, for a short trial of the job script).
MPI_FORWARD=(-x "NCCL_DEBUG=${NCCL_DEBUG:-WARN}")
for name in PATH LD_LIBRARY_PATH PYTHONPATH OMP_NUM_THREADS $(compgen -e | grep -E '^(HOROVOD|NCCL)_'); do
  [ "$name" != NCCL_DEBUG ] && [ -n "${!name+set}" ] && MPI_FORWARD+=(-x "$name")
done
true  # the loop's last test may be false; the job scripts run under set -e
TRAIN_LIMITS=(${MAX_STEPS:+train.max_steps=$MAX_STEPS})
