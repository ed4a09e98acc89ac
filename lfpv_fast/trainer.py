"""The trainer: LFPVNet, Adam, cosine annealing with restarts, validation, checkpoints that resume exactly.

Read top to bottom:
  resolve_features  which fast-path switches are on (GPU-only ones on a CPU machine fail here, before any work)
  configure_torch   global torch switches: cuDNN autotuning, or train.deterministic
  Trainer.__init__  its steps in order: checkpoint to resume, data, run folder, network, loss, DDP,
                    optimizer + scheduler, training state, torch.compile, metrics files
  Trainer.fit       the loop: step, log, validate, checkpoint, stop on SIGINT/SIGTERM
  train_step        one published training step (both outputs, Charbonnier on both, perceptual on the one
                    without the LFPV fusion)
  validate          PSNR/SSIM on the held-out scenes, image grids, best.pth
  checkpoints       everything needed to continue bit-for-bit, loadable with torch.load(weights_only=True)

The hot loop never waits for the GPU: the loss is summed on the device and read (`.item()`) only at the
logging interval; non-finite steps are recorded on the device and checked there too (train.nonfinite=skip
is the exception: deciding to skip a step needs its verdict, so that mode syncs once per step).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random
import re
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from lfpv_fast import distributed
from lfpv_fast.backends import resolve_backend, triton_interpreting
from lfpv_fast.checkpoint import (
    FORMAT,
    atomic_save,
    atomic_write_text,
    is_published_architecture,
    read_checkpoint,
    weights_only_checkpoint,
)
from lfpv_fast.config import ConfigError, RunConfig, config_to_dict
from lfpv_fast.data.smid import DataError
from lfpv_fast.losses import PerceptualLoss, charbonnier_loss
from lfpv_fast.metrics import psnr_batch, ssim_batch
from lfpv_fast.model import BankDraws, LFPVNet

CHECKPOINT_VERSION = 1
CHECKPOINT_RE = re.compile(r"^step_(\d+)\.pth$")


# ---------------------------------------------------------------------------------------------
# Fast-path switches


@dataclass
class Features:
    """The fast-path switches as this run uses them ("auto" resolved)."""

    device: torch.device
    backend: str  # "reference" or "triton": the ops actually used
    backend_note: str
    compile: bool
    bf16: bool
    channels_last: bool
    fused_adam: bool
    cuda_graphs: bool

    def describe(self) -> str:
        on = {True: "on", False: "off"}
        graphs = " + CUDA graphs (reduce-overhead)" if self.cuda_graphs else ""
        return (f"device {self.device}, backend {self.backend}{self.backend_note}, compile {on[self.compile]}{graphs}, "
                f"bf16 {on[self.bf16]}, channels_last {on[self.channels_last]}, fused Adam {on[self.fused_adam]}")


def resolve_features(cfg: RunConfig, local_rank: int = 0) -> Features:
    """Resolve "auto" switches for this machine; GPU-only switches without a GPU are a ConfigError."""
    t, d, src = cfg.train, cfg.data, cfg.source
    has_cuda = torch.cuda.is_available()
    if t.device == "cuda" and not has_cuda:
        raise ConfigError(f"{src}: train.device is 'cuda' but this machine has no CUDA device visible to torch "
                          f"{torch.__version__}; set train.device to 'auto' or 'cpu'")
    use_cuda = t.device == "cuda" or (t.device == "auto" and has_cuda)
    if not use_cuda:
        asked = []
        if t.backend == "triton" and not triton_interpreting():
            asked.append("train.backend=triton -> 'reference' or 'auto'")
        if t.bf16 == "on":
            asked.append("train.bf16=on -> 'auto' or 'off'")
        if t.fused_adam == "on":
            asked.append("train.fused_adam=on -> 'auto' or 'off'")
        if t.cuda_graphs:
            asked.append("train.cuda_graphs=true -> false")
        if t.backend == "triton" and t.compile == "on":  # interpreted kernels cannot be traced
            asked.append("train.compile=on with train.backend=triton -> compile 'off', or backend 'reference'")
        if d.device == "gpu":
            asked.append("data.device=gpu -> 'cpu'")
        if asked:
            why = "train.device is 'cpu'" if t.device == "cpu" else "no CUDA device is visible"
            raise ConfigError(f"{src}: this run trains on the CPU ({why}), but the config asks for GPU-only "
                              f"features; change {'; '.join(asked)} (or run on a machine with a CUDA GPU)")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")

    resolved = resolve_backend(t.backend, device, training=True)
    if resolved.name is None:
        raise ConfigError(f"{src}: train.backend=triton: {resolved.reason}; set train.backend to 'reference' or 'auto'")
    backend, backend_note = resolved.name, ""
    if resolved.reason:  # the reference ops run on CUDA too, slowly: say why
        backend_note = f" (Triton unavailable: {resolved.reason})"
        warnings.warn(f"train.backend=auto runs the reference ops on {device}{backend_note}", RuntimeWarning,
                      stacklevel=2)

    def switch(value: str) -> bool:
        return value == "on" or (value == "auto" and use_cuda)

    return Features(
        device=device,
        backend=backend,
        backend_note=backend_note,
        compile=switch(t.compile),
        bf16=switch(t.bf16) and (t.bf16 == "on" or torch.cuda.is_bf16_supported()),
        channels_last=t.channels_last,
        fused_adam=switch(t.fused_adam),
        cuda_graphs=t.cuda_graphs,
    )


def configure_torch(cfg: RunConfig, device: torch.device) -> str | None:
    """Process-wide torch switches for this run; returns a description when train.deterministic is on.

    Default: cuDNN picks its fastest kernels (training crops have one fixed size). train.deterministic: the same
    seed gives bit-identical losses, run after run, on a busy machine too: deterministic algorithms only (an op
    without one is an error naming it), deterministic cuDNN without autotuning, cuBLAS's fixed workspace, and
    a fixed number of CPU threads (train.cpu_threads, default 1), since how a sum is split over threads changes
    its rounding.
    """
    t = cfg.train
    if t.cpu_threads is not None:
        torch.set_num_threads(t.cpu_threads)
    if not t.deterministic:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = device.type == "cuda"
        return None
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first use, which is later
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if t.cpu_threads is None:
        torch.set_num_threads(1)
    return f"deterministic ({torch.get_num_threads()} CPU thread(s))"


# ---------------------------------------------------------------------------------------------
# Pieces of the recipe


def cosine_restart_lambda(lr: float, period: int, eta_min: float):
    """LR factor of the published CosineAnnealingLR_Restart (equal restart weights): a cosine from lr down to
    eta_min over `period` steps, then back to lr. A plain function, so LambdaLR.state_dict() stays plain data."""

    def factor(step: int) -> float:
        t = step % period
        return (eta_min + (lr - eta_min) * 0.5 * (1.0 + math.cos(math.pi * t / period))) / lr

    return factor


def feature_hw(cfg: RunConfig, height: int, width: int) -> tuple[int, int]:
    """Size of the feature map the bank updaters sample: 1/4 of the input cut down to cfg.model.align."""
    a = cfg.model.align
    return height // a * a // 4, width // a * a // 4


def capture_rng() -> dict[str, Any]:
    """Every global RNG as tensors and plain Python values (readable with weights_only=True)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": str(np_name), "keys": [int(k) for k in np_keys], "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "state": [int(v) for v in py_state], "gauss_next": py_gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def checkpoint_step(path: Path) -> int | None:
    m = CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(folder: Path) -> list[Path]:
    """The step_*.pth files in `folder`, oldest first (temporary files of interrupted writes are ignored)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


def write_checkpoint(state: dict[str, Any], folder: Path, step: int, keep: int) -> Path:
    """Atomically write checkpoints/step_<step>.pth, then delete all but the newest `keep`."""
    path = folder / f"step_{step:08d}.pth"
    atomic_save(state, path)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


class StopSignal:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.name: str | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class NonFiniteError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """One training run in `run_dir`. `train_loader`/`val_loader` default to lfpv_fast.pipelines.build_loader.

    Two names for the network: `net` is the bare LFPVNet (its weights, banks and draws generator; what
    checkpoints, validation and the exports use); `wrapped_net` is what the training step calls: `net` inside
    DDP and/or torch.compile, or `net` itself when neither is on.
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: str | Path | None = None,
                 dist_info: distributed.DistInfo | None = None, train_loader: Any = None, val_loader: Any = None,
                 features: Features | None = None) -> None:
        self.cfg = cfg
        self.dist = dist_info or distributed.DistInfo()
        self.main = self.dist.is_main
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.features = features or resolve_features(cfg, self.dist.local_rank)
        self.device = self.features.device
        self._log_file: Any = None
        self._unwritten_log: list[str] = []  # lines logged before train.log is open
        self._damaged: list[Path] = []  # checkpoints that --resume found unreadable

        determinism = configure_torch(cfg, self.device)
        resume_path, checkpoint = self._find_checkpoint(resume)
        self.train_loader, self.val_loader = self._build_loaders(train_loader, val_loader)
        self._open_run_folder()
        self.log(f"run folder {self.run_dir} ({cfg.source}); {self.dist.world_size} process(es); "
                 f"{self.features.describe()}" + (f"; {determinism}" if determinism else ""))
        if checkpoint is not None:
            self._set_aside_later_checkpoints(int(checkpoint["step"]))
        self.net = self._build_net(checkpoint)
        self.perceptual = self._build_perceptual_loss()
        # DDP (bank hook + synchronized updater BatchNorms) before the optimizer: the BatchNorm swap makes new
        # parameters. Then the optimizer, then its saved state (which must overwrite the scheduler's lr).
        self.wrapped_net = distributed.prepare_model(self.net, self.dist, self.device.type == "cuda")
        self.optimizer, self.scheduler = self._build_optimizer()
        self._start_counters(resume_path)
        if checkpoint is not None:
            self._load_training_state(checkpoint)
            self.log(f"resumed from {resume_path} at step {self.step}")
        if self.features.compile:
            # CUDA graphs through inductor's cudagraph trees: the part of the step that fits a graph.
            self.wrapped_net = torch.compile(self.wrapped_net,
                                             mode="reduce-overhead" if self.features.cuda_graphs else None)
        self._open_metrics()

    # -----------------------------------------------------------------------------------------
    # The steps of __init__, in order

    def _find_checkpoint(self, resume: str | Path | None) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint to continue from (None, "latest" or a path), read and checked; (None, None) for a new run.

        "latest" is the newest checkpoint that reads: a damaged newer one (a copy cut short, a full disk) is
        skipped, saying so, and set aside as <name>.damaged once the run folder is open.
        """
        if resume is None:
            if list_checkpoints(self.ckpt_dir):
                raise FileExistsError(f"{self.run_dir} already holds a run (checkpoints/step_*.pth): continue it "
                                      "with --resume, or pick another --out")
            return None, None
        if str(resume) != "latest":
            path = Path(resume).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"--resume: checkpoint {path} does not exist")
            checkpoint = read_checkpoint(path)
        else:
            found = list_checkpoints(self.ckpt_dir)
            if not found:
                raise FileNotFoundError(f"--resume: no checkpoint (step_*.pth) in {self.ckpt_dir}")
            path, checkpoint = None, None
            for candidate in reversed(found):
                try:
                    checkpoint = read_checkpoint(candidate)
                except ValueError as exc:
                    self.log(f"warning: {exc}; trying the checkpoint before it")
                    self._damaged.append(candidate)
                    continue
                path = candidate
                break
            if checkpoint is None:
                raise ValueError(f"--resume: none of the checkpoints in {self.ckpt_dir} can be read "
                                 f"({', '.join(p.name for p in found)})")
            if self._damaged:
                self.log(f"resuming from {path.name}, the newest intact checkpoint (instead of "
                         f"{self._damaged[0].name}, which cannot be read)")
        self._check_resumable(checkpoint, path)
        return path, checkpoint

    def _build_loaders(self, train_loader: Any, val_loader: Any) -> tuple[Any, Any]:
        """The loaders; a missing or broken data file fails here, naming it, before the run folder is made.

        build_loader splits the global batch over the ranks (and refuses a batch that does not split evenly).
        """
        if train_loader is not None and val_loader is not None:
            return train_loader, val_loader
        from lfpv_fast.pipelines import build_loader

        if self.cfg.data.dataset == "demo":
            self._make_demo_dataset()
        rank, world, seed = self.dist.rank, self.dist.world_size, self.cfg.train.seed
        return (train_loader or build_loader(self.cfg, "train", rank, world, seed),
                val_loader or build_loader(self.cfg, "test", rank, world, seed))

    def _make_demo_dataset(self) -> None:
        """The demo dataset is written on first use (some seconds); say so, and where."""
        from lfpv_fast.data.demo import make_demo_dataset

        root = Path(self.cfg.data.demo_root).expanduser()
        if root.is_dir() and any(root.iterdir()):  # there already (make_demo_dataset checks that it is complete)
            make_demo_dataset(root)
            return
        if importlib.util.find_spec("skimage") is None:
            raise DataError("the demo dataset is made from photos that ship inside scikit-image, which is not "
                            "installed: pip install 'lfpv_fast[demo]' (or scikit-image)")
        self.log(f"building the demo dataset in {root} (data.demo_root; once, later runs reuse it)")
        start = time.perf_counter()
        make_demo_dataset(root)
        self.log(f"demo dataset written to {root} in {time.perf_counter() - start:.1f} s")

    def _open_run_folder(self) -> None:
        """config.yaml (the resolved config), train.log, images/, checkpoints/; written by rank 0 only."""
        if not self.main:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "images").mkdir(exist_ok=True)
        for stale in self.ckpt_dir.glob(".*.tmp"):  # left by a write that was killed
            stale.unlink(missing_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
        self._log_file = open(self.run_dir / "train.log", "a")  # noqa: SIM115 - closed in close()
        for line in self._unwritten_log:
            self._log_file.write(line)
        self._unwritten_log.clear()
        self._log_file.flush()

    def _set_aside_later_checkpoints(self, resumed_step: int) -> None:
        """Resuming from an older checkpoint: later step_*.pth belong to the abandoned continuation. Left in place
        they would count for retention (deleting the new ones) and be picked by a later --resume."""
        if not self.main:
            return
        for path in list_checkpoints(self.ckpt_dir):
            if path in self._damaged:
                path.rename(path.with_name(path.name + ".damaged"))
                self.log(f"{path} cannot be read: renamed to {path.name}.damaged")
            elif checkpoint_step(path) > resumed_step:
                path.rename(path.with_name(path.name + ".abandoned"))
                self.log(f"{path} is newer than the resumed step {resumed_step}: renamed to {path.name}.abandoned")

    def _build_net(self, checkpoint: dict[str, Any] | None) -> LFPVNet:
        """The bare LFPVNet. One seed everywhere: every rank builds the same weights and draws the same bank
        updates; a resumed run then takes the checkpoint's weights."""
        t, f = self.cfg.train, self.features
        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        random.seed(t.seed)
        net = LFPVNet(self.cfg.model, backend=f.backend).to(self.device)
        net.seed_draws(t.seed)
        if f.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if checkpoint is not None:
            net.load_state_dict(checkpoint["model"])
        return net

    def _build_perceptual_loss(self) -> PerceptualLoss | None:
        t = self.cfg.train
        if t.perceptual_weight > 0 and t.vgg_weights:
            return PerceptualLoss.from_file(Path(t.vgg_weights).expanduser()).to(self.device)
        if t.perceptual_weight > 0:
            self.log("train.vgg_weights is null: the perceptual loss term is off (pixel losses only)")
        return None

    def _build_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """Adam over the bare net's parameters (after the DDP BatchNorm swap), cosine annealing with restarts."""
        t = self.cfg.train
        optimizer = torch.optim.Adam(self.net.parameters(), lr=t.lr, betas=tuple(t.betas),
                                     weight_decay=t.weight_decay, fused=self.features.fused_adam or None)
        self.lr_factor = cosine_restart_lambda(t.lr, t.restart_period, t.eta_min)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)

    def _start_counters(self, resume_path: Path | None) -> None:
        self.step = 0
        self.best_psnr: float | None = None
        self.input_metrics: tuple[float, float] | None = None
        # Accumulated on the device between logging intervals (read with one sync per interval).
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.grad_norm_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.counted_steps = 0
        self.skipped = 0
        self.last_checkpoint: Path | None = resume_path

    def _open_metrics(self) -> None:
        """metrics.jsonl and val.jsonl (cut back to the resumed step), TensorBoard."""
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if self.main:
            self._truncate_jsonl(self.metrics_path)
            self._truncate_jsonl(self.run_dir / "val.jsonl")
        self.tb = self._tensorboard()

    # -----------------------------------------------------------------------------------------
    # The loop

    def fit(self) -> int:
        """Train to cfg.train.iterations; 0 when done or stopped by a signal, 1 on a non-finite loss."""
        cfg, t = self.cfg, self.cfg.train
        stop = StopSignal()
        bar = tqdm(total=t.iterations, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.main and cfg.logging.progress))
        batches = iter(self.train_loader)
        interval_start, data_wait, interval_steps = time.perf_counter(), 0.0, 0
        try:
            while self.step < t.iterations:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:  # end of the epoch: the loader's next __iter__ is the next epoch
                    batches = iter(self.train_loader)
                    batch = next(batches, None)
                    if batch is None:
                        raise RuntimeError(f"the training split yields no batches (data.dataset={cfg.data.dataset}, "
                                           f"global batch {cfg.data.batch_size}): too few training images?")
                data_wait += time.perf_counter() - t0

                self.train_step(batch)
                self.step += 1
                interval_steps += 1
                bar.update(1)
                last = self.step == t.iterations

                if self.step % cfg.logging.every == 0 or last:
                    elapsed = time.perf_counter() - interval_start
                    row = self._log_interval(interval_steps, elapsed, data_wait)
                    bar.set_postfix(loss=f"{row['loss']:.4g}", data_wait=f"{row['data_wait']:.0%}", refresh=False)
                    interval_start, data_wait, interval_steps = time.perf_counter(), 0.0, 0
                if self.step % cfg.val.every == 0 or last:
                    self._check_finite()
                    self.validate()
                if self.step % t.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                if not last and distributed.any_rank(stop.name is not None, self.dist):
                    path = self.save_checkpoint()
                    self.log(f"stopped by {stop.name or 'a signal on another rank'} after step {self.step}; "
                             f"checkpoint {path}. Resume with: python -m lfpv_fast.train --out {self.run_dir} --resume")
                    return 0
        except NonFiniteError as exc:
            self.log(str(exc))
            return 1
        finally:
            bar.close()
            stop.restore()
        self.finish()
        return 0

    # -----------------------------------------------------------------------------------------
    # One step

    def loss(self, out: torch.Tensor, without_lfpv: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Published: Charbonnier on both outputs, plus the perceptual loss on the output without the LFPV."""
        t = self.cfg.train
        loss = t.pixel_weight * (charbonnier_loss(out.float(), gt) + charbonnier_loss(without_lfpv.float(), gt))
        if self.perceptual is not None:
            loss = loss + t.perceptual_weight * self.perceptual(without_lfpv, gt).float()
        return loss

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.features.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def forward_backward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs, the loss, its gradients (all-reduced by DDP). Returns (loss, grad norm) on the device."""
        net, f = self.net, self.features
        lq = batch["lq"].to(self.device, non_blocking=True)
        gt = batch["gt"].to(self.device, non_blocking=True)
        if f.channels_last:
            lq = lq.contiguous(memory_format=torch.channels_last)
        snr = net.snr_mask(lq)  # on the device, from the crop as augmented (as published)
        # The draws come from the shared generator on the host, then travel pinned and asynchronously.
        draws = BankDraws.sample(feature_hw(self.cfg, *lq.shape[-2:]), net.config.bank_size, net.config.patch_size,
                                 net.draw_generator)
        if self.device.type == "cuda":
            draws = BankDraws(*(x.pin_memory() for x in (draws.vector_pos, draws.patch_pos, draws.vector_partner,
                                                         draws.patch_partner))).to(self.device)
        with self.autocast():
            out, without_lfpv = self.wrapped_net(lq, snr, draws)
            loss = self.loss(out, without_lfpv, gt)
        # DDP averages gradients over ranks; scaling by the world size makes them the gradient of the global
        # batch's (summed) loss, exactly what one process would compute on the whole batch.
        (loss * self.dist.world_size).backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None])
        return loss.detach(), grad_norm.detach()

    def train_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """forward_backward, then Adam and the scheduler. Returns the loss (a device tensor; no sync)."""
        net = self.net
        skip_mode = self.cfg.train.nonfinite == "skip"
        if skip_mode:  # a skipped step must not keep its bank update or BatchNorm statistics either
            saved_buffers = [b.detach().clone() for b in net.buffers()]
        loss, grad_norm = self.forward_backward(batch)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if skip_mode:
            # The one per-step sync of this mode; all ranks skip together.
            if distributed.any_rank(not bool(finite), self.dist):
                with torch.no_grad():
                    for b, old in zip(net.buffers(), saved_buffers, strict=True):
                        b.copy_(old)
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.skipped += 1
                self.log(f"step {self.step + 1}: non-finite loss or gradient, step skipped "
                         f"({self.skipped} so far; train.nonfinite=skip)")
                return loss
        else:
            self.first_bad_step = torch.where(~finite & (self.first_bad_step < 0), self.step + 1, self.first_bad_step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.loss_sum += loss
        self.grad_norm_sum += grad_norm
        self.counted_steps += 1
        return loss

    # -----------------------------------------------------------------------------------------
    # Logging

    def log(self, message: str) -> None:
        """Print (rank 0 only) and append to train.log; what is logged before train.log opens is written then."""
        if not self.main:
            return
        tqdm.write(message)
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n"
        if self._log_file is None:
            self._unwritten_log.append(line)
            return
        self._log_file.write(line)
        self._log_file.flush()

    def _tensorboard(self) -> Any:
        if not (self.main and self.cfg.logging.tensorboard):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.log("tensorboard is not installed: scalars go to metrics.jsonl only (pip install tensorboard)")
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _truncate_jsonl(self, path: Path) -> None:
        """Drop rows past the current step: a resumed run rewrites the steps after its checkpoint."""
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if isinstance(row, dict) and 0 < row.get("step", 0) <= self.step:
                keep.append(line)
        path.write_text("".join(line + "\n" for line in keep))

    def _log_interval(self, steps: int, elapsed: float, data_wait: float) -> dict[str, Any]:
        """The one sync of an interval: read the summed loss (over ranks: the global batch's loss)."""
        totals = torch.stack([self.loss_sum, self.grad_norm_sum])
        if self.dist.enabled:
            dist.all_reduce(totals)
            totals[1] /= self.dist.world_size  # every rank holds the same (all-reduced) gradients
        counted = max(self.counted_steps, 1)  # skipped steps add nothing to the sums
        self.counted_steps = 0
        loss_sum, grad_norm_sum = totals.tolist()
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self._check_finite()
        row = {
            "step": self.step,
            "loss": loss_sum / counted,
            "grad_norm": grad_norm_sum / counted,
            "lr": self.cfg.train.lr * self.lr_factor(self.step - 1),  # the rate this step used
            "images_per_s": steps * self.cfg.data.batch_size / max(elapsed, 1e-9),
            "data_wait": data_wait / max(elapsed, 1e-9),
            "time": time.time(),
        }
        if self.main:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            if self.tb is not None:
                for key in ("loss", "grad_norm", "lr", "images_per_s", "data_wait"):
                    self.tb.add_scalar(f"train/{key}", row[key], self.step)
            if not self.cfg.logging.progress:
                self.log(f"step {self.step}: loss {row['loss']:.5g}, lr {row['lr']:.3g}, "
                         f"{row['images_per_s']:.1f} img/s, data wait {row['data_wait']:.0%}")
        return row

    def _check_finite(self) -> None:
        """train.nonfinite=stop: raise if any step so far had a non-finite loss or gradient (one sync)."""
        bad = self.first_bad_step.clone()
        if self.dist.enabled:
            bad = torch.where(bad < 0, torch.iinfo(torch.long).max, bad)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            bad = torch.where(bad == torch.iinfo(torch.long).max, -1, bad)
        first = int(bad.item())
        if first < 0:
            return
        good = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else \
            "no checkpoint was written before it"
        resume = f" (resume with: python -m lfpv_fast.train --out {self.run_dir} --resume " \
                 f"{self.last_checkpoint})" if self.last_checkpoint else ""
        raise NonFiniteError(f"error: non-finite loss or gradient at step {first}; stopped at step {self.step}; "
                             f"{good}{resume}. Lower train.lr, check the data, or set train.nonfinite=skip.")

    # -----------------------------------------------------------------------------------------
    # Validation

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """PSNR/SSIM of input and output against the ground truth over the test split (sharded over ranks)."""
        net, v = self.net, self.cfg.val
        net.eval()
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # psnr, ssim, in psnr, in ssim, count
        limit = None if v.max_images is None else -(-v.max_images // self.dist.world_size)
        grids = []
        self.val_loader.load_state_dict({"epoch": 0, "batch": 0})  # always the same images, from the start
        for batch in self.val_loader:
            lq = batch["lq"].to(self.device, non_blocking=True)
            gt = batch["gt"].to(self.device, non_blocking=True)
            if limit is not None:
                room = limit - int(sums[4].item())
                if room <= 0:
                    break
                lq, gt = lq[:room], gt[:room]
            # Full precision, eager: validation is rare and its numbers should not depend on the fast path.
            out = net(lq, net.snr_mask(lq)).float().clamp(0, 1)
            sums += torch.stack([psnr_batch(out, gt).sum(), ssim_batch(out, gt).sum(), psnr_batch(lq, gt).sum(),
                                 ssim_batch(lq, gt).sum(), torch.tensor(float(lq.shape[0]), device=self.device)])
            for i in range(lq.shape[0]):
                if len(grids) < v.save_images:
                    name = f"{batch['scene'][i]}_{batch['frame'][i]}"
                    grids.append((name, torch.cat([lq[i], out[i], gt[i]], dim=2).cpu()))
        net.train()
        if self.dist.enabled:
            dist.all_reduce(sums)
        count = max(sums[4].item(), 1.0)
        psnr, ssim, in_psnr, in_ssim = (x / count for x in sums[:4].tolist())
        result = {"step": self.step, "psnr": psnr, "ssim": ssim, "input_psnr": in_psnr, "input_ssim": in_ssim,
                  "images": int(sums[4].item())}
        self.input_metrics = (in_psnr, in_ssim)
        is_best = self.best_psnr is None or psnr > self.best_psnr
        if is_best:
            self.best_psnr = psnr
        if self.main:
            self._save_grids(grids)
            with open(self.run_dir / "val.jsonl", "a") as fh:
                fh.write(json.dumps(result) + "\n")
            if self.tb is not None:
                self.tb.add_scalar("val/psnr", psnr, self.step)
                self.tb.add_scalar("val/ssim", ssim, self.step)
            self.log(f"validation at step {self.step} ({result['images']} images): PSNR {psnr:.2f} dB, "
                     f"SSIM {ssim:.4f} (input {in_psnr:.2f} dB, {in_ssim:.4f})" + (" - best so far" if is_best else ""))
            if is_best:
                atomic_save(self.checkpoint_state(), self.ckpt_dir / "best.pth")
        return result

    def _save_grids(self, grids: list[tuple[str, torch.Tensor]]) -> None:
        """input | output | ground truth, side by side, one PNG per image."""
        from PIL import Image

        for name, grid in grids:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(self.run_dir / "images" / f"step_{self.step:08d}_{safe}.png")

    # -----------------------------------------------------------------------------------------
    # Checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs, as tensors and plain values (no pickled objects)."""
        return {
            "format": FORMAT,
            "version": CHECKPOINT_VERSION,
            "model_config": asdict(self.net.config),
            "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "best_psnr": self.best_psnr,
            "config": config_to_dict(self.cfg),
            "rng": capture_rng(),
            "draw_generator": self.net.draw_generator.get_state(),
            "loader": {k: int(v) for k, v in self.train_loader.state_dict().items()},
            "world_size": self.dist.world_size,
        }

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step_<step>.pth on rank 0 (once per step), keeping the newest train.keep_checkpoints."""
        path = self.ckpt_dir / f"step_{self.step:08d}.pth"
        if self.last_checkpoint == path:
            return path
        self._check_finite()  # never write a checkpoint that holds a non-finite step
        if self.main:
            write_checkpoint(self.checkpoint_state(), self.ckpt_dir, self.step, self.cfg.train.keep_checkpoints)
        self.last_checkpoint = path
        return path

    def _check_resumable(self, checkpoint: dict[str, Any], path: Path) -> None:
        needed = ("format", "model", "optimizer", "scheduler", "step", "rng", "loader")
        missing = [k for k in needed if k not in checkpoint]
        if checkpoint.get("format") != FORMAT or missing:
            raise ValueError(f"checkpoint {path} is not a training checkpoint of lfpv_fast (missing {missing}); "
                             "weights-only files can be evaluated but not resumed")
        if checkpoint["model_config"] != asdict(self.cfg.model):
            raise ValueError(f"checkpoint {path} was trained with model config {checkpoint['model_config']}, but the "
                             f"run config has {asdict(self.cfg.model)}; resume with the run's config.yaml")

    def _load_training_state(self, checkpoint: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.step = int(checkpoint["step"])
        self.best_psnr = checkpoint.get("best_psnr")
        restore_rng(checkpoint["rng"])
        self.net.draw_generator.set_state(checkpoint["draw_generator"])
        self.train_loader.load_state_dict(checkpoint["loader"])

    # -----------------------------------------------------------------------------------------
    # The end

    def finish(self) -> None:
        """Exports (weights only, published format) and a summary of where everything is."""
        if self.dist.enabled:
            dist.barrier(group=self.dist.control_group)
        if not self.main:
            return
        atomic_save(weights_only_checkpoint(self.net), self.run_dir / "final_weights.pth")
        original = self.run_dir / "final_original_format.pth"
        if is_published_architecture(self.net.config):
            atomic_save(self.net.to_original_state_dict(), original)
            published = f"; published format: {original}"
        else:
            # The published format has no room for a config: a reader takes it for the SMID architecture.
            published = (f"; {original.name} is not written: the published format holds only the published "
                         "architecture (the default model section)")
        lines = [f"done: {self.step} steps."]
        if self.input_metrics is not None and self.best_psnr is not None:
            last = json.loads((self.run_dir / "val.jsonl").read_text().splitlines()[-1])
            lines.append(f"validation ({last['images']} held-out images): input PSNR {last['input_psnr']:.2f} dB / "
                         f"SSIM {last['input_ssim']:.4f} -> output PSNR {last['psnr']:.2f} dB / SSIM "
                         f"{last['ssim']:.4f} ({last['psnr'] - last['input_psnr']:+.2f} dB)")
        lines += [
            f"  images (input | output | ground truth): {self.run_dir / 'images'}",
            f"  log: {self.run_dir / 'train.log'}; metrics: {self.metrics_path}, {self.run_dir / 'val.jsonl'}",
            f"  checkpoint: {self.last_checkpoint} (best PSNR: {self.ckpt_dir / 'best.pth'})",
            f"  weights: {self.run_dir / 'final_weights.pth'}{published}",
        ]
        self.log("\n".join(lines))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
