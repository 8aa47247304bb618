"""The experiment launcher: ``python -m launch.train --config FILE`` (see docs/LAUNCHER.md).

Modules: config (YAML, overrides, validation), data, models, lr_schedule (learning rate, the fixed
interval's warm-up), checkpoint, rng (RNG states as tensors), resume (resuming and checkpointing a
run), dist (Horovod start-up), loop (training; runstate: what a run holds), elastic (train.elastic),
outputs (rank 0's files), plan (--dry-run), report, reliability (exit codes, rank agreement, watchdog,
skipped steps, fault injection; docs/RELIABILITY.md).
"""
