"""The experiment launcher: ``python -m launch.train --config FILE`` (see docs/LAUNCHER.md).

At the top, the entry points and what they share: train (``kfac-hvd-train``), plan (``--dry-run``),
errors (exit codes and the errors that end a run), report and checkpoint (the command lines
``python -m launch.report`` and ``python -m launch.checkpoint convert``). The rooms:

- config: the schema (schema, section, kfac_section: the ``kfac`` keys from ``kfac_hvd.KFACOptions``),
  YAML 1.2 loading with ``base:`` and overrides (load, yaml12); ``python -m launch.config``.
- dist: the engine: Horovod start-up (horovod_setup), the ranks' world and agreement (world, agreement),
  the device (device) and mixed precision (mixed_precision).
- training: set_up, the loop of steps and epochs (loop, step, step_timer), run (a whole run), elastic,
  resume, run_state (what a run holds), data, models, evaluation, schedules (learning rate, the fixed
  interval's warm-up), guards (watchdog, skipped steps), faults (fault injection), summary.
- store: checkpoint (atomic writes: atomic), convert, rng (RNG states as tensors), run_folder (the lock).
- record: writer (rank 0's files), reader (a run folder read back), report, plots, progress, console.

No module imports another that imports it back, directly or round a circle (tests/test_import_graph.py);
the rooms import config and errors, training imports the other rooms, and none of them imports training
but dist.world (a dataset's identity, which the ranks agree on).
"""
