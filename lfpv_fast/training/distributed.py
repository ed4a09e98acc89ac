"""Data-parallel training across processes: torchrun environment, the bank hook, synchronized BatchNorm.

Start with torchrun (`torchrun --nproc_per_node N -m lfpv_fast.train ...`); a plain `python -m` run is one
process and never touches torch.distributed. NCCL carries the tensors when training on GPUs, gloo on the CPU.

What makes the banks right under DDP (`prepare_model`):
- the sample-updater's batch mean is averaged over ranks before its LayerNorm (`net.bank_all_reduce_mean`),
  so the banks learn from every rank's samples and come out identical on every rank;
- every rank seeds the draws generator with the same seed (the trainer does), so the draws agree;
- the sample-updater MLPs' BatchNorms use the statistics of the global batch. torch.nn.SyncBatchNorm does
  that on CUDA but raises "SyncBatchNorm expected input tensor to be on GPU" for CPU tensors (torch 2.13,
  checked by tests/test_train_distributed.py), so gloo runs use `GlobalBatchNorm2d` below instead. The
  mutual-updater MLPs are left alone: their inputs are the (already identical) banks, so their batch
  statistics agree on every rank without any communication.
All three are differentiable, so together with DDP's gradient averaging (of a loss scaled by the world
size) a step on N ranks computes the gradient of the global batch, as one process would.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from lfpv_fast.models import LFPVNet

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    # A gloo group for small host-side agreements (stop requests) that must never wait on the GPU.
    control_group: dist.ProcessGroup | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(use_cuda: bool, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun set up (env:// rendezvous); a single process gets DistInfo().

    `timeout_s` (train.dist_timeout_s) bounds every collective: a rank that died or stalled makes the others fail
    after it instead of waiting forever (see `lost_ranks` for the error that names it).
    """
    if not launched_by_torchrun():
        return DistInfo()
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {key} is not set: start multi-process "
                               "training with torchrun (see the README)")
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    timeout = datetime.timedelta(seconds=timeout_s)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
        control = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
        control = dist.group.WORLD
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, control_group=control)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def exit_without_finalizing(code: int) -> None:
    """End a torchrun worker with `code` without the interpreter's shutdown, once its work is flushed and closed.

    A gloo process group outlives destroy_process_group once DDP has used it (DDP keeps references to it in C++),
    and with it gloo's worker threads. When one of them releases its last collective's tensors after the
    interpreter began to shut down, it cannot take the GIL: the process aborts ("terminate called without an active
    exception", exit -6) after its run succeeded, and torchrun's agents on the other nodes wait for it until their
    timeout. Under load this ended about one two-node run in ten. Everything of the run is written and closed
    before this is called (checkpoints atomically, logs closed, the run lock released)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any rank (a CPU all-reduce on the gloo control group)."""
    return any_rank_each([flag], info)[0]


def any_rank_each(flags: list[bool], info: DistInfo) -> list[bool]:
    """For each flag: true on every rank if it is true on any rank (one all-reduce for all of them)."""
    if not info.enabled:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.control_group)
    return [bool(v) for v in t.tolist()]


def restart_warning() -> str | None:
    """torchrun --max-restarts with its rendezvous store shared with the workers (its default since torch 2.5): a
    restarted round can read the previous round's addresses and fail to connect (pytorch/pytorch#135712)."""
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if not shared or os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") == "0":
        return None
    return ("warning: torchrun --max-restarts shares its store with the workers here, so a restart can fail to "
            "connect (pytorch/pytorch#135712): start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (README)")


class OtherRankFailed(RuntimeError):
    """Another rank could not go on; this one stops too, quietly (that rank prints the error line)."""

    def __init__(self, rank: int, summary: str) -> None:
        super().__init__(f"rank {rank} failed: {summary}")
        self.rank = rank


def on_every_rank(work: Callable[[], T], info: DistInfo) -> T:
    """Run `work` on every rank; if it raises on any, every rank raises (no rank is left waiting in the next
    collective until the timeout). The lowest failing rank re-raises its own error (its one `error:` line), every
    other rank raises OtherRankFailed. Every rank must call this at the same point."""
    error: Exception | None = None
    result = None
    try:
        result = work()
    except Exception as exc:  # noqa: BLE001 - whatever it is, the other ranks must hear of it
        error = exc
    if info.enabled:
        summary = None if error is None else f"{type(error).__name__}: {error}"[:300]
        gathered: list[str | None] = [None] * info.world_size
        dist.all_gather_object(gathered, summary, group=info.control_group)
        failed = [r for r, m in enumerate(gathered) if m is not None]
        if failed and failed[0] != info.rank:
            raise OtherRankFailed(failed[0], gathered[failed[0]] or "") from error
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def is_lost_peer_error(exc: BaseException) -> bool:
    """A collective failed because another rank died (connection closed) or stalled (timed out)."""
    text = str(exc)
    return isinstance(exc, (dist.DistError, RuntimeError)) and any(
        s in text for s in ("Connection closed", "Connection reset", "Timed out", "timed out", "Broken pipe",
                            "NCCL communicator was aborted", "recvBytes", "sendBytes"))


class Heartbeat:
    """Each rank counts beats into the rendezvous store (torchrun's, at MASTER_ADDR:MASTER_PORT) from a thread, every
    `interval_s`. When a collective fails, the ranks whose count no longer moves are the ones that died or stalled:
    the error can name them (gloo's own message names only a socket address)."""

    def __init__(self, info: DistInfo, interval_s: float = 1.0) -> None:
        self.info, self.interval_s = info, interval_s
        # One key per rank and run (not per restart: torchrun's restart count differs between nodes); a restarted
        # round's ranks write the same keys again, so what counts is whether a count moves, not its value.
        self.prefix = f"lfpv_fast/heartbeat/{os.environ.get('TORCHELASTIC_RUN_ID', 'local')}/"
        self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                   timeout=datetime.timedelta(seconds=30))
        self._stop = threading.Event()
        self._beats = 0
        self.store.set(self.prefix + str(info.rank), "0")
        self._thread = threading.Thread(target=self._run, name="lfpv-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, info: DistInfo) -> Heartbeat | None:
        """A heartbeat under torchrun, None for one process or where the store cannot be reached (the errors then
        say 'another rank')."""
        if not info.enabled:
            return None
        try:
            return cls(info)
        except (RuntimeError, ValueError, KeyError, OSError):
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._beats += 1
            try:
                self.store.set(self.prefix + str(self.info.rank), str(self._beats))
            except Exception:  # noqa: BLE001 - the store is gone (its host ended): nothing left to tell
                return

    def _counts(self) -> list[int | None]:
        counts: list[int | None] = []
        for rank in range(self.info.world_size):
            try:
                key = self.prefix + str(rank)
                counts.append(int(self.store.get(key)) if self.store.check([key]) else None)
            except Exception:  # noqa: BLE001
                counts.append(None)
        return counts

    def silent_ranks(self) -> list[int]:
        """The ranks whose beat did not move over three intervals (this rank excluded)."""
        before = self._counts()
        time.sleep(3 * self.interval_s)
        after = self._counts()
        return [r for r in range(self.info.world_size)
                if r != self.info.rank and (after[r] is None or after[r] == before[r])]

    def stop(self) -> None:
        """Stop beating; waits for a beat in flight, so that no thread is inside the store when the process ends."""
        self._stop.set()
        self._thread.join(timeout=5 * self.interval_s)


def describe_lost(heartbeat: Heartbeat | None) -> str:
    """'rank 1' (or 'ranks 1, 3') that stopped answering, or 'another rank' when that cannot be told."""
    silent = heartbeat.silent_ranks() if heartbeat is not None else []
    if not silent:
        return "another rank"
    return ("rank " if len(silent) == 1 else "ranks ") + ", ".join(map(str, silent))


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of a sum is the sum of the ranks' gradients.

    (torch.distributed.nn.functional.all_reduce does the same but is deprecated in torch 2.13.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(tensor)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The bank hook: mean over ranks of each rank's batch mean (equal local batches -> the global mean)."""
    if tensor.dtype in (torch.float16, torch.bfloat16):  # under autocast: sum in float32 (LayerNorm is next)
        tensor = tensor.float()
    return all_reduce_sum(tensor) / dist.get_world_size()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, on any backend (gloo included).

    Two passes (mean, then the centred sum of squares), each one all-reduce, autograd-aware. Every rank must
    feed the same number of rows (the trainer splits the global batch evenly). Eval mode is plain BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count = x.numel() // x.shape[1] * dist.get_world_size()
        mean = all_reduce_sum(x.sum(dim=(0, 2, 3))) / count
        centred = x - mean[None, :, None, None]
        var = all_reduce_sum((centred * centred).sum(dim=(0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                # Like BatchNorm: the running variance is the unbiased one.
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * (count / max(count - 1, 1)), factor)
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out


def _global_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of `module` with every BatchNorm2d replaced by a GlobalBatchNorm2d holding the same state."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, device=module.weight.device, dtype=module.weight.dtype)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _global_batchnorm(child))
    return module


def sync_sample_updater_batchnorms(net: LFPVNet, use_cuda: bool) -> None:
    """Make the sample-updater MLPs' BatchNorms use global-batch statistics (state dict keys unchanged)."""
    if net.lfpv is None:  # the plain backbone (model.lfpv.enabled=false) has no updaters
        return
    for name in ("sample_vector_mlp", "sample_patch_mlp"):
        mlp = getattr(net.lfpv, name)
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(mlp) if use_cuda else _global_batchnorm(mlp)
        setattr(net.lfpv, name, synced)


def prepare_model(net: LFPVNet, info: DistInfo, use_cuda: bool) -> nn.Module:
    """Wire the bank hook and BatchNorm sync into `net` and wrap it in DDP (returns `net` for one process)."""
    if not info.enabled:
        return net
    net.bank_all_reduce_mean = all_reduce_mean
    sync_sample_updater_batchnorms(net, use_cuda)
    # Buffers are not broadcast each step: the banks and every BatchNorm's running statistics are
    # computed identically on every rank (the tests check it), so a broadcast would only cost time.
    return nn.parallel.DistributedDataParallel(
        net, device_ids=[info.local_rank] if use_cuda else None, broadcast_buffers=False)

