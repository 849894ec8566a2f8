"""A rank of a stage job (`chaintune.distributed.main`) whose stage raises a ChaintuneError on every rank, for
tests/test_distributed.py (put in `chaintune.distributed.WORKER` by the test)."""
from __future__ import annotations

import sys

from chaintune import distributed, stage
from chaintune.errors import TrainingError


def diverging_run(self, job):
    raise TrainingError(f"stage '{job.node.dirname}': loss is nan at step 2/8", "lower the learning rate")


stage.StageExecutor.run = diverging_run

if __name__ == "__main__":
    sys.exit(distributed.main())
