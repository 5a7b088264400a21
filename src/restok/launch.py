"""One command for 1 process, N processes on a node, or N nodes: the stage relaunches itself under torchrun.

DVC and Snakemake run the same command, `python -m restok.stages.<stage> ...`. A distributed stage calls
`relaunch_if_requested("restok.stages.<stage>")` first in `main()`; when `RESTOK_NPROC_PER_NODE` or
`RESTOK_NNODES` asks for more than one process and the process is not already a torchrun worker, it re-executes
the same module and arguments under `torch.distributed.run`:

    RESTOK_NPROC_PER_NODE=8 dvc repro train_generator           # 8 GPUs on this machine
    snakemake --workflow-profile workflow/profiles/slurm         # the rules set both from params `resources`

With more than one node inside a SLURM allocation, it starts one torchrun per node through `srun` with c10d
rendezvous on the allocation's first node. `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` is set so `--max-restarts`
works on torch 2.14 (notes/ecosystem.md section 6); restarted workers resume from the last checkpoint.
"""
from __future__ import annotations

import os
import subprocess
import sys


def _first_host() -> str:
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def torchrun_command(module: str, args: list[str], nproc: int, nnodes: int, max_restarts: int = 3) -> list[str]:
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}"]
    if nnodes == 1:
        return [*run, "--standalone", "-m", module, *args]
    if "SLURM_JOB_ID" not in os.environ:
        raise RuntimeError(f"RESTOK_NNODES={nnodes} needs a SLURM allocation (or launch torchrun on each node "
                           f"yourself: torchrun --nnodes={nnodes} --rdzv-endpoint=HOST:PORT -m {module} ...)")
    rdzv = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={_first_host()}:29500",
            f"--rdzv-id={os.environ['SLURM_JOB_ID']}"]
    return ["srun", f"--nodes={nnodes}", "--ntasks-per-node=1", *run, *rdzv, "-m", module, *args]


def relaunch_if_requested(module: str, argv: list[str] | None = None) -> None:
    """Replace this process by a torchrun launch when more than one process is requested; else return."""
    nproc = int(os.environ.get("RESTOK_NPROC_PER_NODE", "1") or 1)
    nnodes = int(os.environ.get("RESTOK_NNODES", "1") or 1)
    if "LOCAL_RANK" in os.environ or nproc * nnodes <= 1:
        return
    cmd = torchrun_command(module, list(sys.argv[1:] if argv is None else argv), nproc, nnodes)
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    print("restok: launching", " ".join(cmd), flush=True)
    sys.exit(subprocess.run(cmd).returncode)
