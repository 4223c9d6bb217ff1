"""`make test`: the suite as two pytest processes at once. The cluster lane (Ray, the S3 server, pipeline
runs) spends most of its time waiting on processes, ports and the store; the standalone lane (pure
computation: kernels, models, images, configs) fills that time, on CPU time nothing else wants
(SCHED_IDLE): the cluster lane is the longer one, and at any priority above idle the standalone lane
slowed it (Ray runs its workers at nice 15, below a nice-0 test process). Arguments go to both
(`python tests/lanes.py -x tests/test_run.py`); the standalone lane's report follows the cluster lane's.
See tests/conftest.py for which test goes where."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

NO_TESTS = 5  # pytest's exit code when a lane selected nothing


def idle_priority() -> None:
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:  # not Linux
        os.nice(19)


def main(args: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest"]
    with tempfile.TemporaryFile("w+") as log:
        beside = subprocess.Popen(
            [*pytest, "--lane", "standalone", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=idle_priority,
        )
        try:
            cluster = subprocess.call([*pytest, "--lane", "cluster", *args])
            standalone = beside.wait()
        finally:
            if beside.poll() is None:
                beside.terminate()
                beside.wait()
        log.seek(0)
        print(f"\n{'=' * 30} standalone lane {'=' * 30}", flush=True)
        sys.stdout.write(log.read())
    codes = {cluster, standalone}
    return NO_TESTS if codes == {NO_TESTS} else max(codes - {NO_TESTS})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
