"""One command for 1 process, N processes on a node, or N nodes: the stage relaunches itself under torchrun.

DVC and Snakemake run the same command, `python -m restok.stages.<stage> ...`. A distributed stage calls
`relaunch_if_requested("restok.stages.<stage>")` first in `main()`; when `RESTOK_NPROC_PER_NODE` or
`RESTOK_NNODES` asks for more than one process and the process is not already a torchrun worker, it re-executes
the same module and arguments under `torch.distributed.run`:

    RESTOK_NPROC_PER_NODE=8 dvc repro train_generator           # 8 GPUs on this machine
    snakemake --workflow-profile workflow/profiles/slurm         # the rules set both from params `resources`

With more than one node, the launcher must run inside a SLURM allocation of one task per node (both SLURM
profiles submit `--nodes=N` with one task per node and run the job's command once, on the allocation's first
node, outside any job step). It starts one torchrun per node with `srun --nodes=N --ntasks-per-node=1`: a new
step of the allocation, not a nested one, so it cannot wait for resources an enclosing step holds. When it is
started inside a step anyway (SLURM_STEP_ID set, e.g. by a user's own `srun`), it adds `--overlap`, SLURM's
documented form for a step that shares the resources of a running one. The c10d rendezvous is hosted on this
machine (the first node, which runs one of the torchrun agents) at the address SLURM has for it (`NodeAddr` of
the allocation's first node, from `scontrol`; `gethostname()` may resolve to 127.0.1.1 through /etc/hosts, which
no other node can reach), on a port free here, not a fixed 29500 that two jobs on one node would both claim.
`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` is set so `--max-restarts` works on torch 2.14 (docs/tooling.md, ecosystem
§6); restarted workers resume from the last checkpoint. An error that a restart would only repeat (a full disk
while checkpointing) calls `stop_without_restart`: the worker's torchrun agent is told to stop, so the job fails
once, with the worker's message, instead of after three restarts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from restok.cpus import job_cpus


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it; the rendezvous binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def first_node_address() -> str:
    """The address SLURM has for the allocation's first node (`NodeAddr`; by default its node name)."""

    def scontrol(*args: str) -> str:
        try:
            return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise RuntimeError(
                f"`scontrol {' '.join(args)}` failed ({getattr(e, 'stderr', '') or e}): the "
                f"rendezvous address of a multi-node run comes from SLURM"
            ) from None

    def fields(text: str) -> dict[str, str]:
        return dict(f.split("=", 1) for f in text.split() if "=" in f)

    # Snakemake's SLURM jobstep executor passes the job id but strips the other SLURM_* variables
    nodelist = (
        os.environ.get("SLURM_JOB_NODELIST")
        or os.environ.get("SLURM_NODELIST")
        or fields(scontrol("show", "job", "--oneliner", os.environ["SLURM_JOB_ID"])).get("NodeList")
    )
    if not nodelist:
        raise RuntimeError(
            f"SLURM job {os.environ['SLURM_JOB_ID']}: no node list (SLURM_JOB_NODELIST unset and "
            f"`scontrol show job` gives no NodeList)"
        )
    names = scontrol("show", "hostnames", nodelist).split()
    if not names:
        raise RuntimeError(f"`scontrol show hostnames {nodelist}` listed no node")
    return fields(scontrol("show", "node", "--oneliner", names[0])).get("NodeAddr") or names[0]


def stop_without_restart(message: str) -> None:
    """Print `message` and, in a torchrun worker, tell its agent (the parent process) to stop rather than restart
    the workers: for an error that a restart would repeat after redoing the steps since the last checkpoint."""
    print(f"restok: {message}; stopping without a restart", file=sys.stderr, flush=True)
    if "TORCHELASTIC_RUN_ID" in os.environ and os.getppid() > 1:
        os.kill(os.getppid(), signal.SIGTERM)  # the agent shuts its workers down and exits non-zero


def srun_command(nnodes: int) -> list[str]:
    """srun options for one torchrun agent per node of the current allocation."""
    overlap = ["--overlap"] if "SLURM_STEP_ID" in os.environ else []
    return ["srun", *overlap, f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]


def torchrun_command(module: str, args: list[str], nproc: int, nnodes: int, max_restarts: int = 3) -> list[str]:
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}"]
    if nnodes == 1:
        return [*run, "--standalone", "-m", module, *args]
    if "SLURM_JOB_ID" not in os.environ:
        raise RuntimeError(
            f"RESTOK_NNODES={nnodes} needs a SLURM allocation (or launch torchrun on each node "
            f"yourself: torchrun --nnodes={nnodes} --rdzv-endpoint=HOST:PORT -m {module} ...)"
        )
    rdzv = [
        f"--nnodes={nnodes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={first_node_address()}:{free_port()}",
        f"--rdzv-id={os.environ['SLURM_JOB_ID']}",
    ]
    return [*srun_command(nnodes), *run, *rdzv, "-m", module, *args]


def relaunch_if_requested(module: str, argv: list[str] | None = None) -> None:
    """Replace this process by a torchrun launch when more than one process is requested; else return."""
    nproc = int(os.environ.get("RESTOK_NPROC_PER_NODE", "1") or 1)
    nnodes = int(os.environ.get("RESTOK_NNODES", "1") or 1)
    if "LOCAL_RANK" in os.environ or nproc * nnodes <= 1:
        return
    cmd = torchrun_command(module, list(sys.argv[1:] if argv is None else argv), nproc, nnodes)
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    os.environ["RESTOK_CPUS"] = str(job_cpus())  # the job's CPUs, shared by the workers on each node
    print("restok: launching", " ".join(cmd), flush=True)
    sys.exit(subprocess.run(cmd).returncode)
