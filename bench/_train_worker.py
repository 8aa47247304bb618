"""One process that trains run after run (single-rank ``launch.train`` command lines read from stdin, one
JSON object a line: {"run_dir": ..., "argv": [...]}), answering each with {"exit": code} on stdout.

Python, torch and Horovod start once instead of once a run: on a loaded machine that start-up cost as much
as a short run itself. Each run's output goes to RUN_DIR/stdout.txt; every run seeds its own weights, data
order and augmentation (``train.seed``), so a run does not depend on the runs before it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback


def main() -> int:
    from launch.train import main as train

    replies = sys.stdout
    for line in sys.stdin:
        job = json.loads(line)
        # The log is written after the run: the launcher refuses a log.dir that already holds outputs.
        log = io.StringIO()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                code = train(job["argv"])
            except BaseException:
                traceback.print_exc()
                code = 1
        os.makedirs(job["run_dir"], exist_ok=True)
        with open(os.path.join(job["run_dir"], "stdout.txt"), "w") as handle:
            handle.write(log.getvalue())
        replies.write(json.dumps({"exit": code}) + "\n")
        replies.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
