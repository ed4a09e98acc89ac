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
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from lfpv_fast.model import LFPVNet


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


def init(use_cuda: bool, timeout_minutes: int = 30) -> DistInfo:
    """Join the process group torchrun set up (env:// rendezvous); a single process gets DistInfo()."""
    if not launched_by_torchrun():
        return DistInfo()
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {key} is not set: start multi-process "
                               "training with torchrun (see the README)")
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    timeout = datetime.timedelta(minutes=timeout_minutes)  # long enough for a validation pass on rank 0
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


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any rank (a CPU all-reduce on the gloo control group)."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.control_group)
    return bool(t.item())


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

