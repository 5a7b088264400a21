"""Console output and per-step curves.

One rich Console for the whole process, on stderr (stdout stays free for a command's data); `print0` prints on rank 0
only (nanochat). Text is printed as given: no markup (a path like `data/[run]/x.pt` stays intact), no highlighting,
no wrapping at the 80 columns rich assumes outside a terminal. Progress bars are live only on an interactive
terminal; in Snakemake `log:` files and SLURM output they become one plain line per interval, without escape
codes. `CurveWriter` appends rows to `results/<stage>/curve.tsv`, the file DVC `plots:` reads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, markup=False, highlight=False, emoji=False, soft_wrap=True)


def is_main_process() -> bool:
    """Rank 0 of a torchrun group, or the only process (read from the env, so it works before init)."""
    return int(os.environ.get("RANK", 0)) == 0


def print0(*objects, **kwargs) -> None:
    if is_main_process():
        console.print(*objects, **kwargs)


class Ticker:
    """Advances a rich progress bar, or prints `desc: done/total (rate) fields` every `every` steps."""

    def __init__(self, bar: Progress, total: int, desc: str, every: int):
        self.bar, self.total, self.desc, self.every = bar, total, desc, every
        self.task = bar.add_task(desc, total=total, fields="")
        self.done = 0
        self.start = time.perf_counter()

    def advance(self, n: int = 1, **fields) -> None:
        """Count n more items; `fields` (e.g. loss=0.12) are shown beside the bar or appended to the line."""
        before, self.done = self.done, self.done + n
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self.bar.update(self.task, advance=n, fields=text)
        if (
            self.bar.disable
            and is_main_process()
            and (self.done // self.every > before // self.every or self.done >= self.total > before)
        ):
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            console.print(
                f"{self.desc}: {self.done}/{self.total} ({rate:.3g}/s) {text}".rstrip(), highlight=False, markup=False
            )


@contextmanager
def progress(total: int, desc: str, every: int | None = None) -> Iterator[Ticker]:
    """`with progress(n, "encode") as p: ... p.advance(len(batch))`.

    Args:
        total: number of items (steps, images) expected.
        desc: label shown on the bar or at the start of each plain line.
        every: items between plain lines when not interactive (default: about 20 lines in total).
    """
    every = every or max(1, total // 20)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[fields]}"),
        console=console,
        disable=not console.is_interactive or not is_main_process(),
    )
    with bar:
        yield Ticker(bar, total, desc, every)


class CurveWriter:
    """Append-only TSV `step<TAB>col...` with one header line, for `dvc plots`; consistent after resume.

    Args:
        path: the TSV file (results/<stage>/curve.tsv).
        columns: value columns after "step".
        resume_step: None starts a fresh file; otherwise rows with step > resume_step (written after the checkpoint
            the run resumes from) and any half-written last line are dropped, and writing continues.
        keep: a second copy, written row for row, where the orchestrators leave it (<out>/ckpt/curve.tsv): DVC and
            Snakemake delete `path` (a stage output) before a rerun, and a resumed run then takes its history from
            `keep`.
    """

    def __init__(
        self, path: str | Path, columns: Sequence[str], resume_step: int | None = None, keep: str | Path | None = None
    ):
        self.path = Path(path)
        self.columns = list(columns)
        header = "\t".join(["step", *self.columns])
        paths = [self.path] + ([Path(keep)] if keep is not None else [])
        source = next((q for q in paths if q.exists()), None) if resume_step is not None else None
        rows = self._kept_rows(source, header, resume_step) if source is not None else []
        self._files = []
        for q in paths:
            q.parent.mkdir(parents=True, exist_ok=True)
            tmp = q.with_name(f"{q.name}.tmp.{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in [header, *rows]))
            os.replace(tmp, q)
            self._files.append(open(q, "a"))

    def _kept_rows(self, source: Path, header: str, resume_step: int) -> list[str]:
        lines = source.read_text().split("\n")  # the piece after the last "\n" is "" or a half-written row
        if lines == [""]:
            return []
        if lines[0] != header:
            raise ValueError(
                f"{source} has header {lines[0]!r} but this run writes {header!r}; "
                f"delete the file to start the curve afresh"
            )
        n_fields = len(self.columns) + 1
        kept = []
        for line in lines[1:-1]:
            fields = line.split("\t")
            if len(fields) == n_fields and fields[0].isdigit() and int(fields[0]) <= resume_step:
                kept.append(line)
        return kept

    def write(self, step: int, **values: float) -> None:
        if set(values) != set(self.columns):
            raise ValueError(f"{self.path}: got columns {sorted(values)}, expected {sorted(self.columns)}")
        cells = [str(int(step)), *(f"{float(values[c]):.6g}" for c in self.columns)]
        for f in self._files:
            f.write("\t".join(cells) + "\n")
            f.flush()

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> CurveWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
