#!/usr/bin/env python3
"""Job status for snakemake-executor-plugin-cluster-generic: prints running, success or failed for a SLURM job id."""
import subprocess
import sys

RUNNING = {"", "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


def main() -> None:
    job = sys.argv[1].split(";")[0]
    out = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True)
    state = out.stdout.strip().split("\n")[0].split()[0] if out.stdout.strip() else ""
    print("success" if state == "COMPLETED" else "running" if state in RUNNING else "failed")


if __name__ == "__main__":
    main()
