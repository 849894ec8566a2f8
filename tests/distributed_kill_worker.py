"""A rank of a stage job (`chaintune.distributed.main`) in which rank 1 SIGKILLs itself after optimizer step
KILL_STEP, for tests/test_distributed.py (put in `chaintune.distributed.WORKER` by the test)."""
from __future__ import annotations

import os
import signal
import sys

from chaintune import distributed, stage

KILL_STEP = 5

train_stage = stage.train_stage


def killing_train_stage(*args, **kwargs):
    def on_step(record: dict) -> None:
        if os.environ.get("RANK") == "1" and record["step"] == KILL_STEP:
            os.kill(os.getpid(), signal.SIGKILL)

    return train_stage(*args, on_step=on_step, **kwargs)


stage.train_stage = killing_train_stage

if __name__ == "__main__":
    sys.exit(distributed.main())
