"""The trainer: LFPVNet, Adam, cosine annealing with restarts, validation, checkpoints that resume exactly.

Read top to bottom:
  configure_torch   global torch switches: cuDNN autotuning, or train.deterministic
  Trainer.__init__  its steps in order: checkpoint to resume (checked whole), data, network, loss, DDP,
                    optimizer + scheduler, training state, torch.compile; only then the run folder and the
                    metrics files: a run that cannot start changes nothing in its folder
  Trainer.fit       the loop: step, log, validate, checkpoint, stop on SIGINT/SIGTERM
  train_step        one published training step (both outputs, Charbonnier on both, perceptual on the one
                    without the LFPV fusion)
  validate          PSNR/SSIM on the held-out scenes, image grids, best.pth

The checkpoint format (writing, reading, validation) is lfpv_fast.training.checkpoint's; which fast-path switches are on
is lfpv_fast.training.fast_path's.

The hot loop never waits for the GPU: the loss is summed on the device and read (`.item()`) only at the
logging interval; non-finite steps are recorded on the device and checked there too (train.nonfinite=skip
is the exception: deciding to skip a step needs its verdict, so that mode syncs once per step).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
import random
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from lfpv_fast.config import RunConfig, config_to_dict
from lfpv_fast.data.errors import DataError
from lfpv_fast.io.files import write_output
from lfpv_fast.models import BankDraws, LFPVNet
from lfpv_fast.training import distributed
from lfpv_fast.training.checkpoint import (
    atomic_save,
    check_training_checkpoint,
    export_weights,
    init_backbone,
    load_weights,
    read_checkpoint,
    restore_training_state,
    training_checkpoint,
    write_checkpoint,
)
from lfpv_fast.training.fast_path import Features, resolve_features
from lfpv_fast.training.losses import PerceptualLoss, charbonnier_loss
from lfpv_fast.training.metrics import psnr_batch, ssim_batch
from lfpv_fast.training.run_folder import CHECKPOINT_PATTERN, RunFolder


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
    """Size of the feature map the bank updaters sample: the LFPV site's map of the input cut down to the alignment."""
    return cfg.model.feature_hw(height, width)


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
    """One training run in `run_dir`. `train_loader`/`val_loader` default to lfpv_fast.data.loaders.build_loader.

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
        self.folder = RunFolder(self.run_dir)  # every name and file of the run
        self.ckpt_dir = self.folder.checkpoints
        self.features = features or resolve_features(cfg, self.dist.local_rank)
        self.device = self.features.device
        self._log_file: Any = None
        self._unwritten_log: list[str] = []  # lines logged before train.log is open
        self._damaged: list[Path] = []  # checkpoints that --resume found unreadable
        self._started = False  # set after the first training step of this process (see _start_training)

        # Everything that can fail on bad input runs first and changes nothing on disk (the demo dataset, made
        # on first use, lives outside the run folder): the checkpoint is read and checked whole, the data, the
        # network with its weights, the VGG weights, the optimizer with its state. Under torchrun every rank
        # does these checks (each reads the checkpoint); one that fails stops them all (no rank waits in DDP).
        def check_inputs() -> tuple[Path | None, dict[str, Any] | None]:
            path, checkpoint = self._find_checkpoint(resume)
            self.train_loader, self.val_loader = self._build_loaders(train_loader, val_loader)
            self.val_bands = self._validation_bands()
            self.net = self._build_net(checkpoint, path)
            self.perceptual = self._build_perceptual_loss()
            return path, checkpoint

        determinism = configure_torch(cfg, self.device)
        resume_path, checkpoint = distributed.on_every_rank(check_inputs, self.dist)
        # DDP (bank hook + synchronized updater BatchNorms) before the optimizer: the BatchNorm swap makes new
        # parameters. Then the optimizer, then its saved state (which must overwrite the scheduler's lr).
        self.wrapped_net = distributed.prepare_model(self.net, self.dist, self.device.type == "cuda")
        self.optimizer, self.scheduler = self._build_optimizer()
        self._start_counters(resume_path)
        if checkpoint is not None:
            self.step, self.best_psnr = distributed.on_every_rank(lambda: restore_training_state(
                checkpoint, resume_path, optimizer=self.optimizer, scheduler=self.scheduler,
                draw_generator=self.net.draw_generator, loader=self.train_loader), self.dist)
        self.resumed_step = self.step
        if self.features.compile:
            # CUDA graphs through inductor's cudagraph trees: the part of the step that fits a graph.
            self.wrapped_net = torch.compile(self.wrapped_net,
                                             mode="reduce-overhead" if self.features.cuda_graphs else None)

        # Every check passed: from here on the run folder changes.
        self._open_run_folder()
        self.log(f"run folder {self.run_dir} ({cfg.source}); {self.dist.world_size} process(es); "
                 f"{self.features.describe()}" + (f"; {determinism}" if determinism else ""))
        if checkpoint is not None:
            self.log(f"resumed from {resume_path} at step {self.step}")
            self._log_world_size_change(checkpoint.get("world_size"))
        self._open_metrics()

    # -----------------------------------------------------------------------------------------
    # The steps of __init__, in order

    def _find_checkpoint(self, resume: str | Path | None) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint to continue from (None, "latest", "auto" or a path), read and checked; (None, None) for a
        new run.

        None: a new run, only in a folder that holds no run artefact (lfpv_fast.training.run_folder's guard).
        "latest" is the newest checkpoint that reads: a damaged newer one (a copy cut short, a full disk) is
        skipped, saying so, and set aside as <name>.damaged once the resumed run has started training.
        "auto" (what a restarting launcher passes every time): "latest" where there is a checkpoint, else a new
        run; in a folder with artefacts but no checkpoint only when it is this same run that never reached its
        first checkpoint (RunFolder.restartable_without_checkpoint). One log line says which.
        """
        if resume is None:
            self.folder.check_new_run()
            return None, None
        auto = False
        if str(resume) == "auto":
            if not self.folder.list_checkpoints():
                artefacts = self.folder.artefacts()
                if not artefacts:
                    self.log(f"--resume auto: no checkpoint in {self.folder.checkpoints}: starting a new run")
                    return None, None
                allowed, why = self.folder.restartable_without_checkpoint(config_to_dict(self.cfg))
                if not allowed:
                    raise self.folder.refuse_new_run(artefacts, why)
                self.log(f"--resume auto: no checkpoint in {self.folder.checkpoints}, and the run there has this "
                         "run's config (it stopped before its first checkpoint): starting it again from step 0")
                return None, None
            resume = "latest"
            auto = True
        if str(resume) != "latest":
            path = Path(resume).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"--resume: checkpoint {path} does not exist")
            checkpoint = read_checkpoint(path)
        else:
            found = self.folder.list_checkpoints()
            if not found:
                raise FileNotFoundError(f"--resume: no checkpoint ({CHECKPOINT_PATTERN}) in {self.ckpt_dir}")
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
            if auto:
                self.log(f"--resume auto: resuming from {path}, the newest complete checkpoint")
        check_training_checkpoint(checkpoint, path, self.cfg.model)
        return path, checkpoint

    def _log_world_size_change(self, saved: Any) -> None:
        """A checkpoint of another world size resumes; the log says what that changes (README: the rule)."""
        now = self.dist.world_size
        if not isinstance(saved, int) or saved == now:
            return
        batch = self.cfg.data.batch_size
        self.log(f"world size changed: the checkpoint was written by {saved} process(es), this run has {now}. "
                 f"data.batch_size={batch} stays the global batch (per rank {batch // saved} -> {batch // now}); the "
                 "learning-rate schedule (by step) and the data order (the same global batches) do not change; the "
                 "sums over ranks change order, so the numbers equal the old world size's up to rounding")

    def _build_loaders(self, train_loader: Any, val_loader: Any) -> tuple[Any, Any]:
        """The loaders; a missing or broken data file fails here, naming it, before the run folder is made.

        build_loader splits the global batch over the ranks (and refuses a batch that does not split evenly).
        """
        if train_loader is not None and val_loader is not None:
            return train_loader, val_loader
        from lfpv_fast.data.loaders import build_loader

        if self.cfg.data.dataset == "demo":
            self._make_demo_dataset()
        rank, world, seed = self.dist.rank, self.dist.world_size, self.cfg.train.seed
        return (train_loader or build_loader(self.cfg, "train", rank, world, seed, log=self.log),
                val_loader or build_loader(self.cfg, "test", rank, world, seed, log=self.log))

    def _make_demo_dataset(self) -> None:
        """The demo dataset is written on first use (some seconds); say so, and where."""
        from lfpv_fast.data.demo import dataset_is_current, make_demo_dataset

        root = Path(self.cfg.data.demo_root).expanduser()
        if dataset_is_current(root):
            return
        if importlib.util.find_spec("skimage") is None:
            raise DataError("the demo dataset is made from photos that ship inside scikit-image, which is not "
                            "installed: pip install 'lfpv_fast[demo]' (or scikit-image)")
        self.log(f"building the demo dataset in {root} (data.demo_root; once, later runs reuse it)")
        start = time.perf_counter()
        make_demo_dataset(root)
        self.log(f"demo dataset written to {root} in {time.perf_counter() - start:.1f} s")

    def _validation_bands(self) -> dict[str, str] | None:
        """The demo datasets' exposure band of each held-out image (by `<scene>_<frame>`), reported per band."""
        from lfpv_fast.data.demo import dataset_is_current, frame_bands

        if self.cfg.data.dataset not in ("demo", "demo_png") or not dataset_is_current(self.cfg.data.demo_root):
            return None  # (not the demo, or loaders of the caller's own)
        return frame_bands(self.cfg.data.demo_root)

    def _open_run_folder(self) -> None:
        """config.yaml (the resolved config), train.log, images/, checkpoints/; written by rank 0 only, and only
        once every check of __init__ has passed."""
        if not self.main:
            return
        self.folder.prepare(yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
        self._log_file = self.folder.open_log()  # closed in close()
        for line in self._unwritten_log:
            self._log_file.write(line)
        self._unwritten_log.clear()
        self._log_file.flush()

    def _start_training(self) -> None:
        """After the first training step of this process: what a resumed run leaves behind is set aside only now,
        so a run that fails to start loses nothing.

        Resuming from an older checkpoint: later step_*.pth belong to the abandoned continuation. Left in place
        they would count for retention (deleting the new ones) and be picked by a later --resume; they are
        renamed to .abandoned (unreadable ones to .damaged), and the metrics files are cut back to the resumed
        step (the steps after it are being trained again).
        """
        self._started = True
        if not self.main:
            return
        for path, target, damaged in self.folder.set_aside_after_resume(self.resumed_step, self._damaged):
            if damaged:
                self.log(f"{path} cannot be read: renamed to {target.name}")
            else:
                self.log(f"{path} is newer than the resumed step {self.resumed_step}, and training has resumed "
                         f"from there: renamed to {target.name} (kept, not deleted)")

    def _build_net(self, checkpoint: dict[str, Any] | None, path: Path | None) -> LFPVNet:
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
            load_weights(net, checkpoint["model"], path)
        elif self.cfg.model.init_from:
            init_backbone(net, self.cfg.model.init_from)
            self.log(f"model.init_from: the backbone starts from {self.cfg.model.init_from} (LFPVs fresh)")
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
        self.values_per_step = 0  # output values (B x 3 x H x W over all ranks) of a step, for the per-pixel loss
        self.skipped = 0  # non-finite steps skipped (train.nonfinite=skip) by this process
        self.consecutive_skips = 0
        self.applied_steps = 0  # steps of this process whose update was applied
        self.last_checkpoint: Path | None = resume_path
        self._last_save_time = time.monotonic()  # for train.checkpoint_minutes

    def _open_metrics(self) -> None:
        """TensorBoard (metrics.jsonl and val.jsonl are appended to; cut back to the resumed step once training
        starts)."""
        self.tb = self._tensorboard()

    # -----------------------------------------------------------------------------------------
    # The loop

    def fit(self) -> int:
        """Train to cfg.train.iterations; 0 when done or stopped by a signal, 1 on a non-finite loss (or, with
        train.nonfinite=skip, too many skipped steps in a row, or every step skipped)."""
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
                if not self._started:
                    self._start_training()
                self._check_skips()
                interval_steps += 1
                bar.update(1)
                last = self.step == t.iterations

                if self.step % cfg.logging.every == 0 or last:
                    elapsed = time.perf_counter() - interval_start
                    row = self._log_interval(interval_steps, elapsed, data_wait)
                    shown = "skipped" if row["loss_per_pixel"] is None else f"{row['loss_per_pixel']:.4g}"
                    bar.set_postfix(loss=shown, data_wait=f"{row['data_wait']:.0%}", refresh=False)
                    interval_start, data_wait, interval_steps = time.perf_counter(), 0.0, 0
                if self.step % cfg.val.every == 0 or last:
                    self._check_finite()
                    if self.skipped and not self.applied_steps:  # nothing learned yet: no best.pth of it
                        self.log(f"validation at step {self.step} left out: every step so far was skipped")
                    else:
                        self.validate()
                if self.step % t.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                if last:
                    continue
                # One agreement per step (a CPU all-reduce under torchrun): every rank stops, or checkpoints, at
                # the same step boundary, so no rank writes or leaves while another is still training.
                time_due = t.checkpoint_minutes is not None and \
                    time.monotonic() - self._last_save_time >= 60 * t.checkpoint_minutes
                stop_now, save_now = distributed.any_rank_each([stop.name is not None, time_due], self.dist)
                if save_now and not stop_now:
                    self.save_checkpoint()
                if stop_now:
                    path = self.save_checkpoint()
                    self.log(f"stopped by {stop.name or 'a signal on another rank'} after step {self.step}; "
                             f"checkpoint {path}. Resume with: python -m lfpv_fast.train --out {self.run_dir} --resume")
                    return 0
            if self.skipped and not self.applied_steps:
                raise NonFiniteError(f"error: every step of this run ({self.skipped}) had a non-finite loss or "
                                     "gradient and was skipped (train.nonfinite=skip): nothing was learned, so no "
                                     "weights are exported. Lower train.lr or check the data.")
        except NonFiniteError as exc:
            self.log(str(exc), stderr=True)  # an `error:` line: on stderr, as every tool's errors
            return 1
        finally:
            bar.close()
            stop.restore()
        self.finish()
        return 0

    # -----------------------------------------------------------------------------------------
    # One step

    def loss(self, out: torch.Tensor, without_lfpv: torch.Tensor | None, gt: torch.Tensor) -> torch.Tensor:
        """Published: Charbonnier on both outputs, plus the perceptual loss on the output without the LFPV.

        The plain backbone (model.lfpv.enabled=false, without_lfpv None) has one output: the pixel loss on it once
        and the perceptual loss on it (the ablation's plain side sees the same terms minus the LFPV output's)."""
        t = self.cfg.train
        loss = t.pixel_weight * charbonnier_loss(out.float(), gt)
        if without_lfpv is not None:
            loss = loss + t.pixel_weight * charbonnier_loss(without_lfpv.float(), gt)
        if self.perceptual is not None:
            loss = loss + t.perceptual_weight * self.perceptual(out if without_lfpv is None else without_lfpv,
                                                                gt).float()
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
        draws = None
        if net.lfpv_enabled:
            draws = BankDraws.sample(feature_hw(self.cfg, *lq.shape[-2:]), net.config.lfpv.bank_size,
                                     net.config.lfpv.patch_size, net.draw_generator)
        if draws is not None and self.device.type == "cuda":
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
                self.consecutive_skips += 1
                self.log(f"step {self.step + 1}: non-finite loss or gradient, step skipped ({self.skipped} so far, "
                         f"{self.consecutive_skips} in a row; train.nonfinite=skip)")
                return loss
            self.consecutive_skips = 0
        else:
            self.first_bad_step = torch.where(~finite & (self.first_bad_step < 0), self.step + 1, self.first_bad_step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.loss_sum += loss
        self.grad_norm_sum += grad_norm
        self.counted_steps += 1
        self.applied_steps += 1
        self.values_per_step = batch["lq"].numel() * self.dist.world_size  # shapes are host metadata: no sync
        return loss

    def _check_skips(self) -> None:
        """train.nonfinite=skip: too many skipped steps in a row end the run (it is not learning)."""
        limit = self.cfg.train.max_consecutive_skips
        if self.consecutive_skips < limit:
            return
        good = f"the last checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
        raise NonFiniteError(f"error: {limit} steps in a row (steps {self.step - limit + 1} to {self.step}) had a "
                             f"non-finite loss or gradient and were skipped (train.max_consecutive_skips={limit}): "
                             f"stopping at step {self.step}, the run is not learning; {good}. Lower train.lr or "
                             "check the data.")

    # -----------------------------------------------------------------------------------------
    # Logging

    def log(self, message: str, stderr: bool = False) -> None:
        """Print (rank 0 only; on stderr with `stderr`) and append to train.log; what is logged before train.log
        opens is written then."""
        if not self.main:
            return
        tqdm.write(message, file=sys.stderr if stderr else None)
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
            self.log(f"tensorboard is not installed: scalars go to {self.folder.metrics.name} only "
                     "(pip install tensorboard)")
            return None
        return SummaryWriter(str(self.folder.tensorboard))

    def _log_interval(self, steps: int, elapsed: float, data_wait: float) -> dict[str, Any]:
        """The one sync of an interval: read the summed loss (over ranks: the global batch's loss).

        `loss` is the published training loss, a sum over every value of the global batch (so it scales with
        batch and crop size); `loss_per_pixel` divides it by the number of output values (B x 3 x H x W), a number
        that reads the same for any batch. An interval whose steps were all skipped has no loss (null), not 0.
        """
        totals = torch.stack([self.loss_sum, self.grad_norm_sum])
        if self.dist.enabled:
            dist.all_reduce(totals)
            totals[1] /= self.dist.world_size  # every rank holds the same (all-reduced) gradients
        counted = self.counted_steps  # skipped steps add nothing to the sums
        self.counted_steps = 0
        loss_sum, grad_norm_sum = totals.tolist()
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self._check_finite()
        loss = loss_sum / counted if counted else None
        row = {
            "step": self.step,
            "loss": loss,
            "loss_per_pixel": loss / self.values_per_step if counted else None,
            "grad_norm": grad_norm_sum / counted if counted else None,
            "lr": self.cfg.train.lr * self.lr_factor(self.step - 1),  # the rate this step used
            "images_per_s": steps * self.cfg.data.batch_size / max(elapsed, 1e-9),
            "data_wait": data_wait / max(elapsed, 1e-9),
            "time": time.time(),
        }
        if self.main:
            self.folder.append_row(self.folder.metrics, row)
            if self.tb is not None:
                for key in ("loss", "loss_per_pixel", "grad_norm", "lr", "images_per_s", "data_wait"):
                    if row[key] is not None:
                        self.tb.add_scalar(f"train/{key}", row[key], self.step)
            if not self.cfg.logging.progress:
                if counted:
                    shown = f"loss {row['loss_per_pixel']:.5g} per pixel (batch sum {row['loss']:.5g})"
                else:
                    shown = f"no loss (all {steps} step(s) since the last line were skipped: non-finite)"
                self.log(f"step {self.step}: {shown}, lr {row['lr']:.3g}, "
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
    def validate(self) -> dict[str, Any]:
        """PSNR/SSIM of input and output against the ground truth over the test split (sharded over ranks)."""
        net, v = self.net, self.cfg.val
        net.eval()
        # Per group: psnr, ssim, in psnr, in ssim, count. Group 0 is every image; then one per band (demo only).
        band_names = list(dict.fromkeys(self.val_bands.values())) if self.val_bands else []
        sums = torch.zeros(1 + len(band_names), 5, dtype=torch.float64, device=self.device)
        limit = None if v.max_images is None else -(-v.max_images // self.dist.world_size)
        grids = []
        self.val_loader.load_state_dict({"epoch": 0, "batch": 0})  # always the same images, from the start
        for batch in self.val_loader:
            lq = batch["lq"].to(self.device, non_blocking=True)
            gt = batch["gt"].to(self.device, non_blocking=True)
            if limit is not None:
                room = limit - int(sums[0, 4].item())
                if room <= 0:
                    break
                lq, gt = lq[:room], gt[:room]
            # Full precision, eager: validation is rare and its numbers should not depend on the fast path.
            out = net(lq, net.snr_mask(lq)).float().clamp(0, 1)
            per_image = torch.stack([psnr_batch(out, gt), ssim_batch(out, gt), psnr_batch(lq, gt), ssim_batch(lq, gt),
                                     torch.ones(lq.shape[0], dtype=out.dtype, device=self.device)], dim=1)
            sums[0] += per_image.sum(0).to(sums.dtype)
            for i in range(lq.shape[0]):
                name = f"{batch['scene'][i]}_{batch['frame'][i]}"
                band = self.val_bands.get(name.removeprefix("_")) if self.val_bands else None  # demo_png: no scene
                if band is not None:
                    sums[1 + band_names.index(band)] += per_image[i].to(sums.dtype)
                if len(grids) < v.save_images:
                    grids.append((name, torch.cat([lq[i], out[i], gt[i]], dim=2).cpu()))
        net.train()
        if self.dist.enabled:
            dist.all_reduce(sums)

        def means(row: torch.Tensor) -> dict[str, Any]:
            count = max(row[4].item(), 1.0)
            psnr, ssim, in_psnr, in_ssim = (x / count for x in row[:4].tolist())
            return {"psnr": psnr, "ssim": ssim, "input_psnr": in_psnr, "input_ssim": in_ssim, "images": int(row[4])}

        result: dict[str, Any] = {"step": self.step, **means(sums[0])}
        if band_names:
            result["bands"] = {name: means(sums[1 + k]) for k, name in enumerate(band_names)
                               if sums[1 + k, 4] > 0}  # (a band without held-out images here: not reported)
        psnr, ssim, in_psnr, in_ssim = (result[k] for k in ("psnr", "ssim", "input_psnr", "input_ssim"))
        self.input_metrics = (in_psnr, in_ssim)
        is_best = self.best_psnr is None or psnr > self.best_psnr
        if is_best:
            self.best_psnr = psnr
        if self.main:
            self._save_grids(grids)
            self.folder.append_row(self.folder.validation, result)
            if self.tb is not None:
                self.tb.add_scalar("val/psnr", psnr, self.step)
                self.tb.add_scalar("val/ssim", ssim, self.step)
            self.log(f"validation at step {self.step} ({result['images']} images): PSNR {psnr:.2f} dB, "
                     f"SSIM {ssim:.4f} (input {in_psnr:.2f} dB, {in_ssim:.4f})" + (" - best so far" if is_best else ""))
            for name, band in result.get("bands", {}).items():
                self.log(f"  exposure {name} ({band['images']} images): PSNR {band['input_psnr']:.2f} -> "
                         f"{band['psnr']:.2f} dB, SSIM {band['input_ssim']:.4f} -> {band['ssim']:.4f}")
            if is_best:
                atomic_save(self.checkpoint_state(), self.folder.best)
        return result

    def _save_grids(self, grids: list[tuple[str, torch.Tensor]]) -> None:
        """input | output | ground truth, side by side, one PNG per image."""
        from PIL import Image

        for name, grid in grids:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            encoded = io.BytesIO()
            Image.fromarray(pixels).save(encoded, format="PNG")
            # Atomic; a full disk is an OutputWriteError naming the file (status 1, as for a checkpoint).
            write_output(self.folder.image(self.step, safe), lambda f, data=encoded: f.write(data.getvalue()))

    # -----------------------------------------------------------------------------------------
    # Checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs (the format is lfpv_fast.training.checkpoint.training_checkpoint)."""
        return training_checkpoint(self.net, self.optimizer, self.scheduler, step=self.step, best_psnr=self.best_psnr,
                                   config=config_to_dict(self.cfg), loader_state=self.train_loader.state_dict(),
                                   world_size=self.dist.world_size)

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step_<step>.pth on rank 0 (once per step), keeping the newest train.keep_checkpoints."""
        path = self.folder.checkpoint(self.step)
        if self.last_checkpoint == path:
            return path
        self._check_finite()  # never write a checkpoint that holds a non-finite step
        if self.main:
            write_checkpoint(self.checkpoint_state(), self.ckpt_dir, self.step, self.cfg.train.keep_checkpoints)
        self.last_checkpoint = path
        self._last_save_time = time.monotonic()
        return path

    # -----------------------------------------------------------------------------------------
    # The end

    def finish(self) -> None:
        """Exports (weights only, published format) and a summary of where everything is."""
        if self.dist.enabled:
            dist.barrier(group=self.dist.control_group)
        if not self.main:
            return
        published = export_weights(self.net, self.folder)
        lines = [f"done: {self.step} steps."]
        if self.input_metrics is not None and self.best_psnr is not None:
            last = self.folder.last_row(self.folder.validation)
            lines.append(f"validation ({last['images']} held-out images): input PSNR {last['input_psnr']:.2f} dB / "
                         f"SSIM {last['input_ssim']:.4f} -> output PSNR {last['psnr']:.2f} dB / SSIM "
                         f"{last['ssim']:.4f} ({last['psnr'] - last['input_psnr']:+.2f} dB)")
            for name, band in last.get("bands", {}).items():
                lines.append(f"  exposure {name} ({band['images']} images): PSNR {band['input_psnr']:.2f} -> "
                             f"{band['psnr']:.2f} dB, SSIM {band['input_ssim']:.4f} -> {band['ssim']:.4f}")
        lines += [
            f"  images (input | output | ground truth): {self.folder.images}",
            f"  log: {self.folder.log}; metrics: {self.folder.metrics}, {self.folder.validation}",
            f"  checkpoint: {self.last_checkpoint} (best PSNR: {self.folder.best})",
            f"  weights: {self.folder.final_weights}{published}",
        ]
        self.log("\n".join(lines))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
