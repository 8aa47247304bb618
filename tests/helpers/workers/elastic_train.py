"""``python -m launch.train`` under horovodrun's elastic driver, with the test's host changes tied to steps.

KFAC_ELASTIC_DIR holds the file ``hosts`` that tests/helpers/workers/elastic_hosts.sh answers with. With
KFAC_ELASTIC_PLAN = '{"STEP": ["host:slots", ...], ...}', rank 0 rewrites ``hosts`` at the commit of
each STEP and waits until the driver's notice of the change has arrived before committing, so the reset
happens at that commit: the step of a planned leave or join does not depend on timing.
"""

import json
import os
import sys
import time

from launch.train import main
from launch.training import elastic

PLAN = {int(step): hosts for step, hosts in json.loads(os.environ.get("KFAC_ELASTIC_PLAN", "{}")).items()}
NOTICE_TIMEOUT_S = 120.0
done: set[int] = set()
commit = elastic.ElasticState.commit


def planned_commit(self) -> None:
    step = self.progress.step
    if self.hvd.rank() == 0 and step in PLAN and step not in done:
        done.add(step)
        path = os.path.join(os.environ["KFAC_ELASTIC_DIR"], "hosts")
        with open(path + ".tmp", "w") as fh:
            fh.write("".join(f"{host}\n" for host in PLAN[step]))
        os.replace(path + ".tmp", path)
        print(f"elastic test: step {step}: hosts now {' '.join(PLAN[step])}", flush=True)
        deadline = time.monotonic() + NOTICE_TIMEOUT_S
        while self.horovod._host_messages.empty():  # the driver polls the script about once a second
            if time.monotonic() > deadline:
                raise RuntimeError(f"no host notice {NOTICE_TIMEOUT_S:g} s after step {step}")
            time.sleep(0.05)
    commit(self)


elastic.ElasticState.commit = planned_commit

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
