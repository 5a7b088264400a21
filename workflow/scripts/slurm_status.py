#!/usr/bin/env python3
"""Job status for snakemake-executor-plugin-cluster-generic: prints running, success or failed for a SLURM job id.

sacct answers from the accounting database, which may lag behind or be disabled; when it knows nothing of the
job, squeue (the controller's live queue) decides: a job neither of them knows is gone, so it failed, instead of
being reported running forever. Only a known end state is success or failed: a query that fails (a busy or
restarting controller, a database timeout) is tried TRIES times, and if it still fails the job reads as running,
so the next status check asks again; reading it as failed would make Snakemake retry a job that is still running.
"""

import subprocess
import sys
import time

RUNNING = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
    "SPECIAL_EXIT",
    "RESV_DEL_HOLD",
}
FAILED = {
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "REVOKED",
}
TRIES, PAUSE_S, TIMEOUT_S = 3, 1.0, 30
# answers that mean "this job is not known here", not "the query failed": squeue on a job that left the queue, and
# sacct on a cluster without accounting
UNKNOWN_JOB = ("Invalid job id specified", "accounting storage is disabled")


def first_word(cmd: list[str]) -> str | None:
    """The first word of the command's answer ("" when it does not know the job), or None when it failed TRIES
    times (exit status, timeout, not installed)."""
    for attempt in range(TRIES):
        if attempt:
            time.sleep(PAUSE_S)
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            why = f"{type(e).__name__}: {e}"
            continue
        if out.returncode == 0:
            words = out.stdout.split()
            return words[0].rstrip("+") if words else ""
        if any(text in out.stderr for text in UNKNOWN_JOB):
            return ""
        why = f"exit status {out.returncode}: {out.stderr.strip()[-300:]}"
    print(f"slurm_status: `{' '.join(cmd)}` failed {TRIES} times ({why})", file=sys.stderr)
    return None


def status(job: str) -> str:
    sacct = first_word(["sacct", "-j", job, "-X", "-n", "-P", "-o", "State"])
    # --states=all: without it squeue omits a job that has ended (COMPLETED, ...) though the controller still holds it
    squeue = first_word(["squeue", "-h", "--states=all", "-j", job, "-o", "%T"]) if not sacct else None
    state = sacct or squeue
    if state == "COMPLETED":
        return "success"
    if state in FAILED:
        return "failed"
    if state in RUNNING:
        return "running"
    if state == "" and sacct == "":  # both answered, neither knows the job: it is gone
        print(f"slurm_status: job {job}: unknown to sacct and squeue", file=sys.stderr)
        return "failed"
    print(
        f"slurm_status: job {job}: {f'state {state}' if state else 'SLURM could not be asked'}; reporting running "
        f"until a known end state",
        file=sys.stderr,
    )
    return "running"


if __name__ == "__main__":
    print(status(sys.argv[1].split(";")[0]))
