"""A training run's folder, the one home of its names and files: what they are called, which of them make a folder
a run, the lock a run holds on it, and the bookkeeping a resume does in it.

    DIR/config.yaml            the resolved config          DIR/train.log       the log (appended)
    DIR/metrics.jsonl          one row per logging step     DIR/val.jsonl       one row per validation
    DIR/tensorboard/           TensorBoard scalars
    DIR/images/step_<8 digits>_<image>.png   validation grids (input | output | ground truth)
    DIR/checkpoints/step_<8 digits>.pth   training checkpoints (newest train.keep_checkpoints kept)
    DIR/checkpoints/best.pth   the checkpoint of the best validation PSNR
    DIR/final_weights.pth      the exported weights (what enhance, evaluate and the app read)
    DIR/final_original_format.pth   the same in the published format (published architecture only)
    DIR/.lock                  held (flock) by the run that is using the folder; removed when it ends

A checkpoint that a resume found unreadable is renamed <name>.damaged, one newer than the resumed step (an
abandoned continuation) <name>.abandoned: set aside, never deleted.

The logs and rows are written through RunFolder too (open_log, append_row, last_row, truncate_logs). Nothing here
imports torch: the names are plain data, and checkpoint.py builds on them (it writes the checkpoints and exports).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
from pathlib import Path
from typing import TextIO

from lfpv_fast.io.files import atomic_write_text

CONFIG = "config.yaml"
LOG = "train.log"
METRICS = "metrics.jsonl"
VALIDATION = "val.jsonl"
IMAGES = "images"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
BEST = "best.pth"
FINAL_WEIGHTS = "final_weights.pth"
FINAL_ORIGINAL = "final_original_format.pth"
LOCK = ".lock"
DAMAGED = ".damaged"
ABANDONED = ".abandoned"
CHECKPOINT_RE = re.compile(r"^step_(\d+)\.pth$")
CHECKPOINT_PATTERN = "step_*.pth"  # how a message names them


def step_name(step: int) -> str:
    """How a step is named in the run's files: step_<8 digits> (checkpoints, validation images)."""
    return f"step_{step:08d}"


def checkpoint_name(step: int) -> str:
    return f"{step_name(step)}.pth"


def checkpoint_step(path: Path) -> int | None:
    """N for a file named step_N.pth, else None."""
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(folder: Path) -> list[Path]:
    """The step_*.pth files in `folder`, oldest first (temporary files of interrupted writes are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p))


def run_dir_of_checkpoint(checkpoint: Path) -> Path:
    """The run folder of a checkpoint: DIR for DIR/checkpoints/step_N.pth, else the file's folder."""
    folder = Path(checkpoint).expanduser().resolve().parent
    return folder.parent if folder.name == CHECKPOINTS else folder


class RunFolderError(ValueError):
    """The folder cannot take this run (it holds another one); one line naming what it holds and the ways on."""


class RunFolderBusy(RunFolderError):
    """Another process holds the folder's lock."""


class RunFolder:
    """The paths of one run folder and what is done to its files (the trainer writes through it, rank 0 only)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / CHECKPOINTS
        self.config = self.root / CONFIG
        self.log = self.root / LOG
        self.metrics = self.root / METRICS
        self.validation = self.root / VALIDATION
        self.images = self.root / IMAGES
        self.tensorboard = self.root / TENSORBOARD
        self.best = self.checkpoints / BEST
        self.final_weights = self.root / FINAL_WEIGHTS
        self.final_original = self.root / FINAL_ORIGINAL
        self.lock_path = self.root / LOCK

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    def image(self, step: int, name: str) -> Path:
        return self.images / f"{step_name(step)}_{name}.png"

    def list_checkpoints(self) -> list[Path]:
        return list_checkpoints(self.checkpoints)

    # --- what makes a folder a run ----------------------------------------------------------------

    def artefacts(self) -> list[str]:
        """The run artefacts the folder holds, as names relative to it (empty: not a run, any --out may use it).

        Any of config, log, metrics, weights, checkpoints (set-aside ones included), validation images or
        TensorBoard files; the lock file and files the runs never write do not count.
        """
        found = [p for p in (self.config, self.log, self.metrics, self.validation, self.final_weights,
                             self.final_original) if p.is_file()]
        for folder in (self.checkpoints, self.images, self.tensorboard):
            if folder.is_dir():
                found += sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
        return [str(p.relative_to(self.root)) for p in found]

    def describe(self, names: list[str], shown: int = 4) -> str:
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        return ", ".join(names[:shown]) + more

    def refuse_new_run(self, artefacts: list[str], why: str = "") -> RunFolderError:
        """The guard's error: the folder holds a run; the two ways on."""
        return RunFolderError(f"{self.root} already holds a run ({self.describe(artefacts)}){why}: continue it with "
                              "--resume (or --resume auto), or pick another --out")

    def check_new_run(self) -> None:
        """A new run (no --resume) starts only in a folder that holds no run artefact."""
        artefacts = self.artefacts()
        if artefacts:
            raise self.refuse_new_run(artefacts)

    def restartable_without_checkpoint(self, config: dict) -> tuple[bool, str]:
        """--resume auto in a folder with artefacts but no checkpoint: may the run start again from step 0?

        Only when it is this same run that never reached its first checkpoint (an elastic restart or a
        preemption before it): its config.yaml is this run's config, and nothing was exported. Anything else
        is another run's result, which is never overwritten. Returns (allowed, why not).
        """
        if self.final_weights.is_file() or self.final_original.is_file():
            return False, f" with exported weights but no {CHECKPOINT_PATTERN} to resume from"
        if not self.config.is_file():
            return False, f" but no {CONFIG} to tell whether it is this run"
        import yaml

        try:
            saved = yaml.safe_load(self.config.read_text())
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            saved = None
        if saved != json.loads(json.dumps(config)):  # (lists and tuples compare as YAML reads them)
            return False, f", and its {CONFIG} is not this run's config"
        return True, ""

    # --- the lock ---------------------------------------------------------------------------------

    def lock(self) -> RunLock:
        """Hold the folder's exclusive lock (creating the folder); RunFolderBusy names the process that holds it."""
        return RunLock(self)

    # --- bookkeeping --------------------------------------------------------------------------------

    def prepare(self, config_text: str) -> None:
        """checkpoints/ and images/, temporary files of a killed write removed, config.yaml written."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.images.mkdir(exist_ok=True)
        # A write killed mid-way (kill -9, power loss) leaves its temporary next to the file it was replacing:
        # checkpoints, but also the exported weights, config.yaml and validation images.
        for folder in (self.root, self.checkpoints, self.images):
            for stale in folder.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        atomic_write_text(self.config, config_text)

    def set_aside(self, path: Path, damaged: bool) -> Path:
        """Rename a checkpoint to <name>.damaged or <name>.abandoned (kept, never deleted)."""
        target = path.with_name(path.name + (DAMAGED if damaged else ABANDONED))
        path.rename(target)
        return target

    def set_aside_after_resume(self, resumed_step: int, unreadable: list[Path]) -> list[tuple[Path, Path, bool]]:
        """Once a resumed run trains: every checkpoint newer than `resumed_step` (an abandoned continuation, which
        would otherwise count for retention and be picked by a later --resume) renamed .abandoned, and the
        `unreadable` ones .damaged; the metrics rows past the resumed step dropped. Returns (path, new path,
        damaged) for each checkpoint set aside."""
        moved = []
        for path in self.list_checkpoints():
            if path in unreadable or checkpoint_step(path) > resumed_step:
                damaged = path in unreadable
                moved.append((path, self.set_aside(path, damaged), damaged))
        self.truncate_logs(resumed_step)
        return moved

    def open_log(self) -> TextIO:
        """train.log, opened for appending (a resumed run adds to it); the caller closes it."""
        return open(self.log, "a")  # noqa: SIM115 - the trainer holds it for the run and closes it

    def append_row(self, path: Path, row: dict) -> None:
        """One JSON row appended to metrics.jsonl or val.jsonl."""
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def last_row(self, path: Path) -> dict:
        """The last row of metrics.jsonl or val.jsonl."""
        return json.loads(path.read_text().splitlines()[-1])

    def truncate_jsonl(self, path: Path, last_step: int) -> None:
        """Drop rows past `last_step` (and lines cut short by a kill): a resumed run logs those steps again."""
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and 0 < row.get("step", 0) <= last_step:
                keep.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    def truncate_logs(self, last_step: int) -> None:
        self.truncate_jsonl(self.metrics, last_step)
        self.truncate_jsonl(self.validation, last_step)


class RunLock:
    """An exclusive flock on DIR/.lock for the life of a run. The OS drops it when the process ends, however it ends
    (kill -9 too), so a lock never outlives its holder; the file names the holder (PID and host) for the message
    a second process prints. `release` removes the file, and the folders this lock made where they are empty."""

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder
        self.created: list[Path] = []  # the folders this lock made, innermost first
        missing = folder.root.absolute()
        while not missing.exists() and missing != missing.parent:
            self.created.append(missing)
            missing = missing.parent
        try:
            folder.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RunFolderError(f"--out {folder.root} is a file, expected a run folder") from None
        path = folder.lock_path
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.read(fd, 200).decode(errors="replace").split()
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise RunFolderError(f"cannot lock the run folder {folder.root} ({path}): {exc.strerror}") from None
                who = f"process {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
                raise RunFolderBusy(f"{folder.root} is in use by another training run ({who} holds {path}): wait "
                                    "for it to end, or pick another --out") from None
            # The holder before us may have removed the file as it released it: hold the file that is there now.
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        self.fd: int | None = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.folder.lock_path.unlink(missing_ok=True)  # while still held: nobody holds a file we remove
        finally:
            os.close(self.fd)
            self.fd = None
        for folder in self.created:  # a run that could not start leaves no empty folder behind
            try:
                folder.rmdir()
            except OSError:
                break
