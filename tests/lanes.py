"""`make test`: the suite as three lanes of pytest processes at once. The cluster lane (one Ray and one S3
server for its pipeline runs) is the longest; the apart lane (tests that start Ray clusters of their own:
several nodes, a job server, the demo) runs beside it at the same priority, filling the time the cluster
lane waits on its processes; the standalone lane (pure computation: kernels, models, images, configs) runs
on CPU time nothing else wants (SCHED_IDLE): at any priority above idle it slowed the others (Ray runs its
workers at nice 15, below a nice-0 test process); so starved, it ended last, alone on one core, so it runs
as two processes, each every other test (`--part`). Arguments go to every lane (`python tests/lanes.py -x
tests/test_run.py`); the other lanes' reports follow the cluster lane's. Every lane writes pytest's cache,
the last to finish winning (`--lf` afterwards may miss the others' failures). See tests/conftest.py for
which test goes where."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile

NO_TESTS = 5  # pytest's exit code when a lane selected nothing


def idle_priority() -> None:
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:  # not Linux
        os.nice(19)


def finished(lane: subprocess.Popen) -> int:
    """The lane's exit code, waiting through Ctrl-C: the terminal interrupted the lane too, and its
    fixtures are stopping servers and Ray clusters that outlive a killed pytest (own sessions)."""
    while True:
        try:
            code = lane.wait()
        except KeyboardInterrupt:
            continue
        return 128 - code if code < 0 else code  # killed by a signal: as a shell reports it


def main(args: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest"]
    selections = {"apart": ["--lane", "apart"]}
    # the standalone lane in two halves: starved while the others run, it ends last, on both cores
    selections |= {f"standalone {k}/2": ["--lane", "standalone", "--part", f"{k}/2"] for k in (1, 2)}
    with contextlib.ExitStack() as files:
        logs = {name: files.enter_context(tempfile.TemporaryFile("w+")) for name in selections}
        beside = {
            name: subprocess.Popen(
                [*pytest, *selection, *args],
                stdout=logs[name],
                stderr=subprocess.STDOUT,
                preexec_fn=idle_priority if name.startswith("standalone") else None,
            )
            for name, selection in selections.items()
        }
        cluster = subprocess.Popen([*pytest, "--lane", "cluster", *args])
        lanes = (cluster, *beside.values())
        # `kill` of this process (a CI timeout): the lanes get SIGINT, on which pytest still tears its
        # fixtures down (servers and Ray nodes in sessions of their own), and are waited for
        signal.signal(signal.SIGTERM, lambda *_: [lane.send_signal(signal.SIGINT) for lane in lanes])
        codes = [finished(lane) for lane in lanes]
        for name, log in logs.items():
            log.seek(0)
            print(f"\n{'=' * 30} {name} lane {'=' * 30}", flush=True)
            sys.stdout.write(log.read())
    failed = [code for code in codes if code not in (0, NO_TESTS)]
    if failed:
        return max(failed)
    return NO_TESTS if set(codes) == {NO_TESTS} else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
