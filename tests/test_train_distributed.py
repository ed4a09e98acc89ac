"""Two gloo ranks on the CPU train exactly like one process on the concatenated batch.

Each rank runs the real Trainer.fit on its half of every global batch (float64, so that the comparison can
be tight). Checked: the banks and every BatchNorm statistic are bit-equal across ranks, the parameters too;
the gradients after DDP's all-reduce equal the single-process gradients of the whole batch (so the loss
scaling, the bank all-reduce and the synchronized BatchNorms are right: Adam alone would hide a scale error);
the logged loss is the global batch's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from helpers import free_port
from lfpv_fast.config import config_to_dict, load_config
from lfpv_fast.training import distributed
from lfpv_fast.training.checkpoint import latest_checkpoint, read_checkpoint
from lfpv_fast.training.trainer import Trainer

# The test wraps optimizer.step to record gradients, which LambdaLR notices.
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")

WORLD = 2
GLOBAL_BATCH = 4
STEPS = 3
CONFIG = [
    "model.nf=8", "model.hr_nf=8", "model.light_blocks=1", "model.layers=1", "model.heads=1", "model.head_dim=16",
    "model.ffn_dim=32", "model.bank_size=8", "model.updater_width=2", "data.crop=32",
    f"data.batch_size={GLOBAL_BATCH}", f"train.iterations={STEPS}", "train.checkpoint_every=100", "val.every=100",
    "val.save_images=0", "logging.every=1", "logging.progress=false", "logging.tensorboard=false",
    "data.demo_root=/nonexistent",  # never read: the loaders are given
]


class FixedLoader:
    """The loader contract over a fixed list of batches (rows [lo, hi) of each global batch)."""

    def __init__(self, batches: list[dict], lo: int, hi: int) -> None:
        self.batches = [{k: v[lo:hi] for k, v in b.items()} for b in batches]
        self.epoch, self.batch = 0, 0

    def __iter__(self):
        while self.batch < len(self.batches):
            self.batch += 1
            yield self.batches[self.batch - 1]
        self.epoch, self.batch = self.epoch + 1, 0

    def __len__(self) -> int:
        return len(self.batches)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]


def make_batches() -> list[dict]:
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(STEPS):
        gt = torch.rand(GLOBAL_BATCH, 3, 32, 32, generator=g, dtype=torch.float64)
        lq = gt * 0.2 + 0.02 * torch.rand(GLOBAL_BATCH, 3, 32, 32, generator=g, dtype=torch.float64)
        batches.append({"lq": lq, "gt": gt, "scene": ["s"] * GLOBAL_BATCH, "frame": [f"{i}" for i in range(4)]})
    return batches


def run_trainer(run_dir: Path, rank: int, world: int, info: distributed.DistInfo) -> dict:
    """Trainer.fit on this rank's rows; returns the final state and the gradients Adam saw at each step."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    batches = make_batches()
    per = GLOBAL_BATCH // world
    train = FixedLoader(batches, rank * per, (rank + 1) * per)
    val = FixedLoader(batches[:1], rank * per, (rank + 1) * per)
    trainer = Trainer(load_config("demo", CONFIG), run_dir, dist_info=info, train_loader=train, val_loader=val)
    grads: list[dict[str, torch.Tensor]] = []
    adam_step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.append({n: p.grad.detach().clone() for n, p in trainer.net.named_parameters()})
        return adam_step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    assert trainer.fit() == 0
    trainer.close()
    return {"state": {k: v.detach().clone() for k, v in trainer.net.state_dict().items()}, "grads": grads,
            "sample_bn": type(trainer.net.lfpv.sample_patch_mlp[1]).__name__,
            "mutual_bn": type(trainer.net.lfpv.mutual_patch_mlp[1]).__name__}


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    info = distributed.init(use_cuda=False)
    try:
        # torch's SyncBatchNorm refuses CPU tensors: the reason GlobalBatchNorm2d exists.
        bn = torch.nn.SyncBatchNorm(2)
        try:
            bn(torch.rand(2, 2, 1, 1))
            sync_bn_on_cpu = True
        except ValueError:
            sync_bn_on_cpu = False
        result = run_trainer(Path(out) / "ddp", rank, WORLD, info)
        result["sync_bn_on_cpu"] = sync_bn_on_cpu
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.barrier()
        distributed.shutdown(info)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], dict, Path]:
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_rank_main, args=(free_port(), str(out)), nprocs=WORLD, start_method="spawn", join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    default, threads = torch.get_default_dtype(), torch.get_num_threads()
    try:
        single = run_trainer(out / "single", 0, 1, distributed.DistInfo())
    finally:
        torch.set_default_dtype(default)
        torch.set_num_threads(threads)
    return ranks, single, out


def assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-12) -> None:
    """Equal up to float64 rounding, measured against the tensor's own scale (elements that are zero in exact
    arithmetic, such as the gradient of a bias that a BatchNorm cancels, are rounding noise of ~1e-14)."""
    err = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= 1e-9 * scale + atol, f"{what}: max error {err:.3g} at scale {scale:.3g}"


def test_updater_batchnorms_sync_without_torch_syncbatchnorm_on_cpu(runs):
    ranks, _, _ = runs
    # If this starts to fail, torch's SyncBatchNorm works on gloo and can replace GlobalBatchNorm2d.
    assert not ranks[0]["sync_bn_on_cpu"]
    assert ranks[0]["sample_bn"] == "GlobalBatchNorm2d" and ranks[0]["mutual_bn"] == "BatchNorm2d"


def test_banks_batchnorm_statistics_and_parameters_are_bit_equal_across_ranks(runs):
    ranks, _, _ = runs
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The banks moved away from their zero init, and the sample-updater BatchNorms saw data.
    assert a["bank_vectors"].abs().sum() > 0
    assert a["lfpv.sample_vector_mlp.1.num_batches_tracked"].item() == STEPS


def test_two_ranks_compute_the_gradient_of_the_whole_batch(runs):
    ranks, single, _ = runs
    assert len(single["grads"]) == STEPS and len(ranks[0]["grads"]) == STEPS
    for step in range(STEPS):
        for name, expected in single["grads"][step].items():
            for r in range(WORLD):
                assert_close_to_scale(ranks[r]["grads"][step][name], expected, f"step {step + 1}, rank {r}, {name}")


def test_two_ranks_end_where_one_process_ends(runs):
    ranks, single, _ = runs
    for key, expected in single["state"].items():
        got = ranks[0]["state"][key]
        if expected.is_floating_point():
            # Adam divides by sqrt(v) + 1e-8: a gradient that is rounding noise (~1e-13, see above) moves its
            # parameter by up to lr * 1e-5 per step, differently in each run. A real difference (a missing
            # all-reduce, an unsynchronized BatchNorm) moves parameters by ~lr = 4e-4 per step.
            assert_close_to_scale(got, expected, key, atol=2e-7)
        else:
            assert torch.equal(got, expected), key


def test_logged_loss_is_the_global_batch_loss(runs):
    _, _, out = runs

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(out / "ddp") == pytest.approx(losses(out / "single"), rel=1e-9)
    assert len(losses(out / "ddp")) == STEPS


def test_torchrun_trains_through_the_cli_like_one_process(tmp_path_factory, tmp_path):
    """The real entry point under torchrun: env:// rendezvous, gloo, the loader's sharding, the run folder chosen by
    rank 0 and written by rank 0 only. Its logged losses match a single process's (float32: reduction order)."""
    cfg = load_config("demo", [*CONFIG, f"data.demo_root={tmp_path_factory.getbasetemp() / 'lfpv-demo-data'}",
                               "data.resize=[64, 48]", "data.test_frames=1", "data.num_workers=0", "val.every=2"])
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    # Every process of the launch registers an exit hook (sitecustomize): the workers end without the interpreter's
    # shutdown, where gloo's threads can abort a finished run (distributed.exit_without_finalizing); the agent does not.
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        "atexit.register(lambda: print('finalized:', os.environ.get('RANK', 'agent'), file=sys.stderr, flush=True))\n")
    path = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
           str(free_port()), "-m", "lfpv_fast.train", "-c", "tiny.yaml"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.findall(r"^finalized: (\w+)$", proc.stderr, flags=re.M) == ["agent"], proc.stderr
    (run,) = list((tmp_path / "runs").glob("tiny-*"))  # one folder for both ranks
    assert read_checkpoint(latest_checkpoint(run))["world_size"] == WORLD
    assert (run / "final_weights.pth").is_file() and "done: 3 steps" in (run / "train.log").read_text()

    single = Trainer(cfg, tmp_path / "single")
    assert single.fit() == 0
    single.close()

    def losses(folder: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert losses(run) == pytest.approx(losses(tmp_path / "single"), rel=1e-4)
