"""Resume never resurrects stale state: one rule for both training stages, in restok.train.ckpt.

    python -m pytest -q tests/stage/test_resume.py

The fingerprint's parts are checked one by one (params minus logging knobs, the code the stage imports, inputs,
library versions); then what `resume` does with the folder: picks the newest checkpoint of this run, moves another
run's checkpoints aside with a message (never deletes them), falls back past an unreadable newest checkpoint, and a
writer killed with SIGKILL in the middle of a save leaves the previous checkpoint as the one resumed. The stage-level
consequences (a code change trains again, a logging change resumes) are in test_stage_train_generator.py.
"""

from __future__ import annotations

import errno
import io
import os
import platform
import signal
import subprocess
import sys
import time

from pathlib import Path

import pytest
import torch

from restok.train import ckpt

SECTIONS = {
    "train_generator": {
        "loop": {
            "max_steps": 10,
            "log_every_steps": 2,
            "ckpt_every_steps": 5,
            "keep_ckpts": 2,
            "workers": 0,
            "seed": 0,
            "checkpointing": "none",
        },
        "val_batches": 1,
    }
}
IGNORE = (*(f"train_generator.{k}" for k in ckpt.LOGGING_KNOBS), "train_generator.val_batches")
MODULE = "restok.stages.train_generator"


def run_id(sections=SECTIONS, inputs=None) -> dict:
    return ckpt.fingerprint(ckpt.run_params(sections, IGNORE), MODULE, inputs or {"latents": "a"})


def with_loop(**loop) -> dict:
    tg = SECTIONS["train_generator"]
    return {"train_generator": {**tg, "loop": {**tg["loop"], **loop}}}


def test_logging_knobs_do_not_change_the_fingerprint_but_result_params_do():
    base = run_id()
    assert run_id(with_loop(log_every_steps=7, ckpt_every_steps=3, keep_ckpts=9, workers=4)) == base
    assert run_id(with_loop(checkpointing="blocks")) == base  # same values and grads: an OOM run resumes with it
    assert run_id({"train_generator": {**SECTIONS["train_generator"], "val_batches": 5}}) == base
    changed = run_id(with_loop(seed=1))
    assert changed["params"] != base["params"] and {k: changed[k] for k in ("code", "inputs", "environment")} == {
        k: base[k] for k in ("code", "inputs", "environment")
    }
    assert run_id(inputs={"latents": "b"})["inputs"] != base["inputs"]


def test_a_python_patch_release_resumes_but_a_minor_release_does_not(monkeypatch):
    base, installed, banner = run_id()["environment"], platform.python_version(), sys.version
    major, minor, micro = sys.version_info[:3]

    def environment(version: str) -> str:  # as if that Python ran: sys.version and sys.version_info both say it
        monkeypatch.setattr(sys, "version", banner.replace(installed, version, 1))
        monkeypatch.setattr(sys, "version_info", (*map(int, version.split(".")), "final", 0))
        assert platform.python_version() == version
        return run_id()["environment"]

    assert environment(f"{major}.{minor}.{micro + 1}") == base
    assert environment(f"{major}.{minor + 1}.0") != base


def test_an_ignored_key_that_does_not_exist_is_refused():
    with pytest.raises(KeyError, match="train_generator.loop.log_every"):
        ckpt.run_params(SECTIONS, ["train_generator.loop.log_every"])


def test_code_part_hashes_the_files_the_stage_imports():
    from restok import deps

    assert run_id()["code"] == deps.code_sha256(MODULE)[:16]  # how it follows an edit: tests/unit/test_deps.py
    names = {f.name for f in deps.closure(MODULE)}
    assert {"train_generator.py", "ckpt.py", "generator.py", "ema.py"} <= names and "score.py" not in names


def _save(folder, step, run):
    ckpt.save(folder, {"step": step, "fingerprint": run, "w": torch.full((2,), float(step))}, step, keep=5)


def test_resume_picks_the_newest_checkpoint_of_this_run(tmp_path):
    run = run_id()
    for step in (2, 4):
        _save(tmp_path, step, run)
    assert ckpt.resume(tmp_path, run)["step"] == 4
    assert ckpt.resume(tmp_path / "missing", run) is None


def test_another_run_is_moved_aside_with_a_message_not_deleted(tmp_path, capsys):
    old, new = run_id(with_loop(seed=1)), run_id()
    for step in (2, 4):
        _save(tmp_path, step, old)
    assert ckpt.resume(tmp_path, new) is None
    err = capsys.readouterr().err
    assert "another run (params differ)" in err and "aside" in err
    assert ckpt.latest(tmp_path) is None
    aside = sorted(p.name for p in (tmp_path / "aside").rglob("step_*.pt"))
    assert aside == ["step_000000002.pt", "step_000000004.pt"]
    _save(tmp_path, 2, new)  # the new run's own checkpoints are then resumed as usual
    assert ckpt.resume(tmp_path, new)["step"] == 2


def test_aside_keeps_the_newest_sets_only(tmp_path, capsys):
    """Four runs in turn in one folder: each resume moves the previous run's checkpoints aside as one set, and only
    the newest ckpt.KEEP_ASIDE (2) sets stay, so reruns cannot fill the disk."""
    runs = [run_id(with_loop(seed=seed)) for seed in range(4)]
    for before, now in zip(runs, runs[1:]):
        for step in (2, 4):
            _save(tmp_path, step, before)
        assert ckpt.resume(tmp_path, now) is None
    sets = sorted((tmp_path / "aside").iterdir())
    assert len(sets) == 2 and "deleted" in capsys.readouterr().err
    for folder, run in zip(sets, runs[1:3]):  # the sets of the 2nd and 3rd runs; the 1st run's set is gone
        assert sorted(p.name for p in folder.iterdir()) == ["step_000000002.pt", "step_000000004.pt"]
        assert all(torch.load(p, weights_only=True)["fingerprint"] == run for p in folder.iterdir())


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    run = run_id()
    for step in (2, 4):
        _save(tmp_path, step, run)
    newest = ckpt.latest(tmp_path)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated: a bad disk, or a non-atomic copy
    state = ckpt.resume(tmp_path, run)
    assert state["step"] == 2 and torch.equal(state["w"], torch.full((2,), 2.0))
    assert "cannot be read" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "aside").rglob("*.pt")] == ["step_000000004.pt"]


READ_ERRORS = {
    "EIO": OSError(errno.EIO, "Input/output error"),
    "ESTALE": OSError(errno.ESTALE, "Stale file handle"),
    "MemoryError": MemoryError(),
    "torch CPU out of memory": RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
        "can't allocate memory: you tried to allocate 1125899906842624 bytes."
    ),
}


@pytest.mark.parametrize("name", sorted(READ_ERRORS))
def test_an_io_or_memory_error_while_reading_stops_and_moves_nothing(tmp_path, monkeypatch, name):
    """Reading the newest checkpoint fails inside torch.load (its file's reads raise): the error propagates and
    both checkpoints stay where they are, instead of a good checkpoint moved aside and training restarted at 0."""
    run = run_id()
    for step in (2, 4):
        _save(tmp_path, step, run)
    error = READ_ERRORS[name]

    class FailingReads(io.FileIO):
        def read(self, *args):
            raise error

        readinto = readall = read

    def open_failing(file, mode="r", *args, **kwargs):  # torch.serialization opens the file with open(name, "rb")
        return FailingReads(file, "r") if Path(file).name == "step_000000004.pt" else open(file, mode, *args, **kwargs)

    monkeypatch.setattr(torch.serialization, "open", open_failing, raising=False)
    with pytest.raises(type(error)) as e:
        ckpt.resume(tmp_path, run)
    assert e.value is error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000002.pt", "step_000000004.pt"]


def test_a_file_that_is_not_a_resume_state_is_moved_aside_alone(tmp_path, capsys):
    run = run_id()
    _save(tmp_path, 2, run)
    torch.save({"w": torch.zeros(2)}, tmp_path / "step_000000004.pt")  # loads, but has no step nor fingerprint
    torch.save(torch.zeros(2), tmp_path / "step_000000006.pt")  # loads, not even a dict
    assert ckpt.resume(tmp_path, run)["step"] == 2
    err = capsys.readouterr().err
    assert "lacks ['step', 'fingerprint']" in err and "holds a Tensor" in err
    assert sorted(p.name for p in (tmp_path / "aside").rglob("*.pt")) == ["step_000000004.pt", "step_000000006.pt"]


WRITER = """
import sys, torch
from restok.train import ckpt
run = eval(sys.argv[2])
ckpt.save(sys.argv[1], {"step": 2, "fingerprint": run, "w": torch.zeros(2)}, 2, keep=5)
print("saved", flush=True)
ckpt.save(sys.argv[1], {"step": 4, "fingerprint": run, "w": torch.zeros(64 * 1024 * 1024)}, 4, keep=5)  # 256 MB
"""


def test_kill_9_mid_save_resumes_the_previous_checkpoint(tmp_path):
    run = run_id()
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), repr(run)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout.readline().strip() == "saved"
    deadline = time.time() + 60
    while not list(tmp_path.glob("*.tmp.*")) and time.time() < deadline:  # the second save has started writing
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.glob("*.tmp.*")), "the writer was killed mid-save, leaving its temporary file"
    state = ckpt.resume(tmp_path, run)
    assert state["step"] == 2
