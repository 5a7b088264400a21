"""The workflow on a real SLURM cluster: the one-machine cluster of `tools/local-slurm` (two nodes n1 and n2 on this
host, four fake GPUs each, partitions `cpu` and `gpu`, accounting through slurmdbd).

What the fake executables of test_slurm.py cannot show: that SLURM accepts what the profiles send, that a job's
state reaches Snakemake (through sacct, or through squeue alone when accounting is off), that a 2-node job runs one
torchrun per node, that a job SLURM cancels halfway resumes from its checkpoint on the profile's retry, and that a
failing job stops the workflow with a message naming its rule and log.

The cluster must be up (`sudo tools/local-slurm start`); without it these tests skip, saying why, unless
RESTOK_REAL_SLURM=require (set by .ci/run), where they fail. Switching accounting off for one test restarts
slurmctld, which needs root; that test skips for other users.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from restok.artifacts import load_artifact
from restok.provenance import read_results
from tests.pipeline.conftest import BIN, REPO, make_workspace, run

pytestmark = pytest.mark.realslurm
LOCAL_SLURM = REPO / "tools" / "local-slurm"
REQUIRE = os.environ.get("RESTOK_REAL_SLURM") == "require"
# short polling: the smoke jobs take seconds to a minute (the profiles' own settings suit a real site)
SLURM = [
    "--workflow-profile",
    "workflow/profiles/slurm",
    "--slurm-init-seconds-before-status-checks",
    "2",
    "--latency-wait",
    "5",
]
SBATCH = [
    "--workflow-profile",
    "workflow/profiles/sbatch",
    "--seconds-between-status-checks",
    "2",
    "--latency-wait",
    "5",
]
# files whose content records when, where or how fast a stage ran, not what it computed; and the lines of score's
# results/README.md that report speeds and wall times
VOLATILE = {"provenance.json"}
TIMING_ROW = re.compile(r"^\| [^|]*\((images/)?s\) \|.*$", re.M)
SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: (\S+)/rule_(\w+)/\d+\.log\)")


def cluster_problem() -> str | None:
    """Why the local cluster cannot take jobs, or None when it can."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM is not installed here (no sinfo/sbatch on PATH)"
    p = subprocess.run([str(LOCAL_SLURM), "status"], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        said = "; ".join(line for line in (p.stdout + p.stderr).splitlines() if line.strip())
        return f"the local SLURM cluster is not up (`tools/local-slurm status`: {said})"
    return None


@pytest.fixture(scope="module")
def cluster():
    why = cluster_problem()
    if why:
        message = f"{why}; start it as root with `tools/local-slurm start` (Debian/Ubuntu, apt)"
        if REQUIRE:
            pytest.fail(f"RESTOK_REAL_SLURM=require: {message}")
        pytest.skip(message)


def set_resources(ws: Path, stage: str, **values) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["resources"][stage].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def sacct(job: str, fields: str) -> list[dict]:
    """The job's accounting lines (allocation first, then its steps)."""
    out = subprocess.run(
        ["sacct", "-j", job, "-n", "-P", "-o", fields], capture_output=True, text=True, check=True
    ).stdout
    names = [name.split("%")[0] for name in fields.split(",")]  # Name%width: the width only widens the column
    return [dict(zip(names, line.split("|"))) for line in out.splitlines()]


def submitted(output: str) -> dict[str, list[str]]:
    """rule -> the SLURM job ids the slurm executor plugin submitted for it, from its log."""
    jobs: dict[str, list[str]] = {}
    for job, _, rule in SUBMITTED.findall(output):
        jobs.setdefault(rule, []).append(job)
    return jobs


def digests(ws: Path) -> dict[str, str]:
    """sha256 of every artifact under data/ and results/ (without checkpoints and volatile files)."""
    out = {}
    for f in sorted([*(ws / "data").rglob("*"), *(ws / "results").rglob("*")]):
        rel = f.relative_to(ws).as_posix()
        if f.is_file() and f.name not in VOLATILE and "/ckpt" not in rel:
            data = f.read_bytes()
            if rel == "results/README.md":
                data = TIMING_ROW.sub("", data.decode()).encode()
            out[rel] = hashlib.sha256(data).hexdigest()
    return out


def start(cmd: list[str], ws: Path, log: Path) -> subprocess.Popen:
    """Start a command in the workspace, its output to log, with the venv first on PATH."""
    return subprocess.Popen(
        cmd,
        cwd=ws,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    )


@pytest.fixture(scope="module")
def smoke_runs(cluster, module_tmp) -> dict[str, tuple[Path, int, str, float]]:
    """The smoke pipeline three ways at once (so the cluster's two nodes and the local run share the wait): locally
    with `snakemake -c2` (the reference), through the slurm profile and through the sbatch profile.
    name -> (workspace, exit status, output, seconds)."""
    commands = {"local": ["snakemake", "-c2"], "slurm": ["snakemake", *SLURM], "sbatch": ["snakemake", *SBATCH]}
    workspaces = {name: make_workspace(module_tmp(name)) for name in commands}
    t0, procs, seconds = time.monotonic(), {}, {}
    try:
        for name, cmd in commands.items():
            procs[name] = start(cmd, workspaces[name], workspaces[name] / "smoke.log")
        while len(seconds) < len(procs):
            for name, proc in procs.items():
                if name not in seconds and proc.poll() is not None:
                    seconds[name] = time.monotonic() - t0
            going = sorted(set(procs) - set(seconds))
            assert time.monotonic() - t0 < 1800, f"smoke runs still going after 30 min: {going}"
            time.sleep(1)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    print("smoke runs: " + ", ".join(f"{name} {t:.0f} s" for name, t in seconds.items()))
    return {
        name: (ws, procs[name].returncode, (ws / "smoke.log").read_text(), seconds[name])
        for name, ws in workspaces.items()
    }


def finished(smoke_runs, name: str) -> tuple[Path, str]:
    ws, rc, output, _ = smoke_runs[name]
    assert rc == 0, f"the {name} smoke run exited {rc}:\n{output[-6000:]}"
    return ws, output


@pytest.fixture(scope="module")
def slurm_run(smoke_runs) -> Path:
    return finished(smoke_runs, "slurm")[0]


def test_smoke_through_slurm_profile(smoke_runs):
    """All 9 jobs through snakemake-executor-plugin-slurm, each in the partition its resources call for, with the
    artifacts of the local run bit for bit (same code, params, lock and thread count per job)."""
    ws, output = finished(smoke_runs, "slurm")
    jobs = submitted(output)
    assert sum(len(ids) for ids in jobs.values()) == 9 and all(len(ids) == 1 for ids in jobs.values()), jobs
    params = yaml.safe_load((ws / "params.yaml").read_text())["resources"]
    for rule, (job,) in jobs.items():
        (alloc, *_) = sacct(job, "Partition,State,AllocCPUS,NNodes,Comment")
        want = "gpu" if params[rule]["gpus"] > 0 else "cpu"
        assert alloc == {
            "Partition": want,
            "State": "COMPLETED",
            "AllocCPUS": str(params[rule]["cpus"]),
            "NNodes": str(params[rule]["nodes"]),
            "Comment": f"rule_{rule}",
        }, (rule, job)
    assert digests(ws) == digests(finished(smoke_runs, "local")[0])


def test_smoke_through_sbatch_profile(smoke_runs):
    """The same through the cluster-generic plugin's plain sbatch: one job per rule, each with its log (the profile
    keeps them all), and the local run's artifacts."""
    ws, _ = finished(smoke_runs, "sbatch")
    outs = sorted(p.name.split("-")[0] for p in (ws / "logs/slurm").glob("*.out"))
    assert outs == sorted(submitted(finished(smoke_runs, "slurm")[1])), outs
    assert digests(ws) == digests(finished(smoke_runs, "local")[0])


def test_two_node_sampling(slurm_run):
    """`sample` at 1 GPU x 2 nodes on the GPU partition: one SLURM job on n1 and n2, whose single srun step runs one
    torchrun agent per node (each rank logs its node), rank 0 alone writes the samples, and they are the 1-process
    run's samples bit for bit, as the README promises for any process count."""
    ws = slurm_run
    before = digests(ws)
    set_resources(ws, "sample", gpus=1, nodes=2)
    p = run(["snakemake", *SLURM, "-R", "sample", "--until", "sample", "--retries", "0"], ws, timeout=600)
    (job,) = submitted(p.stdout + p.stderr)["sample"]
    alloc, *steps = sacct(job, "JobID,Partition,State,NNodes,NTasks,NodeList,AllocTRES%80")
    assert (alloc["Partition"], alloc["State"], alloc["NNodes"], alloc["NodeList"]) == (
        "gpu",
        "COMPLETED",
        "2",
        "n[1-2]",
    ), alloc
    assert "gres/gpu=2" in alloc["AllocTRES"], alloc  # 1 GPU on each node
    (launch,) = [s for s in steps if re.fullmatch(rf"{job}\.\d+", s["JobID"])]  # the launcher's srun
    assert (launch["NNodes"], launch["NTasks"], launch["State"]) == ("2", "2", "COMPLETED"), launch
    log = (ws / "logs/sample.log").read_text()
    ranks = sorted(re.findall(r"restok: rank (\d) of 2 \(local rank 0\) on (n\d),", log))
    assert [r[0] for r in ranks] == ["0", "1"] and {r[1] for r in ranks} == {"n1", "n2"}, log[-3000:]
    assert log.count("sample: wrote ") == 1, log[-3000:]
    assert read_results(ws / "results/sample/summary.json")["world_size"] == 2
    after = digests(ws)
    assert after["data/sample/samples.npz"] == before["data/sample/samples.npz"]


def test_job_keeps_to_its_cpus(slurm_run):
    """A rule asking for 1 CPU gets 1 CPU from SLURM, and its torch threads follow (provenance records them)."""
    ws = slurm_run
    set_resources(ws, "extract_latents", cpus=1)
    p = run(
        ["snakemake", *SLURM, "-R", "extract_latents", "--until", "extract_latents", "--retries", "0"], ws, timeout=600
    )
    (job,) = submitted(p.stdout + p.stderr)["extract_latents"]
    assert sacct(job, "AllocCPUS,State")[0] == {"AllocCPUS": "1", "State": "COMPLETED"}
    env = json.loads((ws / "results/extract_latents/provenance.json").read_text())["environment"]
    assert env["torch_threads"] == 1, env
    set_resources(ws, "extract_latents", cpus=2)


def wait_for(what: str, ready, timeout: float, proc: subprocess.Popen | None = None, pause: float = 0.2):
    t0 = time.monotonic()
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"snakemake ended (exit status {proc.returncode}) before {what}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"no {what} after {timeout:.0f} s")
        time.sleep(pause)


def train_interrupted(ws: Path, profile: list[str], interrupt, log: Path) -> int:
    """Train the tokenizer afresh through `profile`, calling interrupt(log text) once the first checkpoint is written,
    and check that the run ends with the uninterrupted run's tokenizer, resumed from that checkpoint; returns the
    resume step."""
    reference, _, reference_prov = load_artifact(ws / "data/train_tokenizer/tokenizer.pt")
    loop = yaml.safe_load((ws / "params.yaml").read_text())["train_tokenizer"]["loop"]
    first = ws / f"data/train_tokenizer/ckpt/step_{loop['ckpt_every_steps']:09d}.pt"  # restok.train.ckpt's name
    shutil.rmtree(ws / "data/train_tokenizer")  # the finished run's checkpoints would only be published again
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["snakemake", *profile, "-R", "train_tokenizer", "--until", "train_tokenizer"],
            cwd=ws,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        )
        try:
            wait_for(f"checkpoint {first.name}", first.exists, 600, proc)
            interrupt(log.read_text())
            assert proc.wait(timeout=900) == 0, log.read_text()[-6000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    resumed = read_results(ws / "results/train_tokenizer/metrics.json")["resumed_from_step"]
    assert resumed is not None and 0 < resumed < loop["max_steps"], resumed
    assert f"resumed from step {resumed}" in (ws / "logs/train_tokenizer.log").read_text()
    final, _, final_prov = load_artifact(ws / "data/train_tokenizer/tokenizer.pt")
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    assert final_prov == reference_prov
    return resumed


def test_requeued_training_resumes(slurm_run, tmp_path):
    """SLURM requeues the running train_tokenizer job (`scontrol requeue`, what preemption with PreemptMode=REQUEUE
    does) once its first checkpoint is written: the same job runs again, resumes from that step and ends with the
    uninterrupted run's tokenizer, bit for bit, while the slurm profile waits for it."""
    ws = slurm_run
    log = tmp_path / "snakemake.log"

    def requeue(output: str):
        (job,) = submitted(output)["train_tokenizer"]
        subprocess.run(["scontrol", "requeue", job], check=True)

    train_interrupted(ws, SLURM, requeue, log)
    (job,) = submitted(log.read_text())["train_tokenizer"]  # no second submission
    runs = subprocess.run(
        ["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job], capture_output=True, text=True, check=True
    ).stdout.split()
    assert runs == ["REQUEUED", "COMPLETED"], runs


def test_failing_job_names_rule_and_log(slurm_run):
    """A job that fails inside SLURM stops the workflow with a message naming the rule, its log and the SLURM log,
    which the profile keeps."""
    ws = slurm_run
    tokenizer = ws / "data/train_tokenizer/tokenizer.pt"
    tokenizer.write_bytes(b"not a checkpoint")
    p = run(
        ["snakemake", *SLURM, "-R", "extract_latents", "--until", "extract_latents", "--retries", "0"],
        ws,
        check=False,
        timeout=600,
    )
    output = p.stdout + p.stderr
    assert p.returncode != 0, output[-6000:]
    (job,) = submitted(output)["extract_latents"]
    assert sacct(job, "State")[0]["State"] == "FAILED"
    assert "Error in rule extract_latents" in output and "logs/extract_latents.log" in output, output[-6000:]
    slurm_log = f".snakemake/slurm_logs/rule_extract_latents/{job}.log"
    assert slurm_log in output and (ws / slurm_log).is_file(), output[-6000:]
    assert str(tokenizer.relative_to(ws)) in (ws / "logs/extract_latents.log").read_text()


@pytest.fixture(scope="module")
def accounting_off(cluster):
    """slurmctld without accounting (sacct answers "accounting storage is disabled") for the tests that use it, the
    last of this module, then back on."""
    if os.geteuid() != 0:
        pytest.skip("switching SLURM accounting off restarts slurmctld, which needs root")
    subprocess.run([str(LOCAL_SLURM), "start", "--no-accounting"], check=True, capture_output=True, timeout=300)
    try:
        probe = subprocess.run(["sacct", "-j", "1"], capture_output=True, text=True)
        assert "accounting storage is disabled" in probe.stdout + probe.stderr
        yield
    finally:
        subprocess.run([str(LOCAL_SLURM), "start"], check=True, capture_output=True, timeout=300)


def test_cancelled_training_resumes_on_retry_without_accounting(accounting_off, smoke_runs, tmp_path):
    """On a cluster without accounting, SLURM cancels the running train_tokenizer job (`scancel`) once its first
    checkpoint is written: the sbatch profile's status script sees it fail from squeue alone, the profile's retry
    (`retries: 1`) submits it again, and that job resumes from the checkpoint and ends with the uninterrupted run's
    tokenizer, bit for bit. (The slurm profile cannot do this part: see docs/tooling.md, ecosystem §3.)"""
    ws, _ = finished(smoke_runs, "sbatch")
    logs = set((ws / "logs/slurm").glob("train_tokenizer-*.out"))
    jobs = []

    def cancel(_output: str):
        job = subprocess.run(
            ["squeue", "-h", "-n", "smk-train_tokenizer", "-o", "%i"], capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(job) == 1, job
        jobs.extend(job)
        subprocess.run(["scancel", job[0]], check=True)

    train_interrupted(ws, SBATCH, cancel, tmp_path / "snakemake.log")
    (cancelled,) = jobs
    new_logs = sorted(p.name for p in set((ws / "logs/slurm").glob("train_tokenizer-*.out")) - logs)
    assert len(new_logs) == 2 and f"train_tokenizer-{cancelled}.out" in new_logs, new_logs  # the job and its retry
