#!/usr/bin/env python3
"""Job status for snakemake-executor-plugin-cluster-generic: prints running, success or failed for a SLURM job id.

sacct answers from the accounting database, which may lag behind or be disabled; when it knows nothing of the
job, squeue (the controller's live queue) decides: a job neither of them knows is gone, so it failed, instead of
being reported running forever.
"""
import subprocess
import sys

RUNNING = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


def first_word(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    words = out.stdout.split() if out.returncode == 0 else []
    return words[0].rstrip("+") if words else ""


def status(job: str) -> str:
    state = (first_word(["sacct", "-j", job, "-X", "-n", "-P", "-o", "State"])
             or first_word(["squeue", "-h", "-j", job, "-o", "%T"]))
    if state == "COMPLETED":
        return "success"
    if state in RUNNING:
        return "running"
    print(f"slurm_status: job {job}: {state or 'unknown to sacct and squeue'}", file=sys.stderr)
    return "failed"


if __name__ == "__main__":
    print(status(sys.argv[1].split(";")[0]))
