"""The loaders (torch and DALI on the CPU): alignment, coverage and sharding, determinism, resume, and DALI
against the torch reference on the same choices. Each contract runs on SMID-style .npy frames and on the same
frames as image pairs (8-bit and 16-bit PNG, decoded by Pillow/imagecodecs and by DALI). Last, pipelines/ on its
own, on plain inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import make_cfg, write_list, write_png, write_tree
from lfpv_fast.config import ConfigError
from lfpv_fast.data.loaders import build_loader
from lfpv_fast.pipelines.sampling import epoch_draws, per_rank_batch, train_batches

LOADERS = ["torch", "dali"]
W, H = 48, 32  # frames are stored at the resize size, so the integer relation survives the resize
TRAIN = ["s0", "s1", "s2", "s3"]
FRAMES = 3


def offset(scene: str, frame: str) -> int:
    return 10 * int(scene[1:]) + int(frame)


@pytest.fixture(scope="module", params=["npy", "png", "png16"])
def aligned(tmp_path_factory, request):
    """LQ frame k of scene sN is GT // 4 + 10 N + k exactly; t9 is the test scene. npy: an SMID tree (BGR on
    disk); png/png16: the same frames as image pairs <root>/<split>/<scene>/<k>.png (RGB on disk), one GT
    copy per frame, the test split in its own folders."""
    root = tmp_path_factory.mktemp(f"aligned-{request.param}")
    rng = np.random.default_rng(0)
    gts = {s: rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for s in [*TRAIN, "t9"]}
    lqs = {s: [(g // 4 + offset(s, str(k))).astype(np.uint8) for k in range(FRAMES)] for s, g in gts.items()}
    if request.param == "npy":
        write_tree(root, lqs, gts)
        write_list(root / "test.txt", ["t9"])
    else:
        bits = 16 if request.param == "png16" else 8
        for scene, frames in lqs.items():
            prefix = "test_" if scene == "t9" else ""
            for k, lq in enumerate(frames):
                write_png(root / f"{prefix}lq" / scene / f"{k:04d}.png", lq[:, :, ::-1], bits)
                write_png(root / f"{prefix}gt" / scene / f"{k:04d}.png", gts[scene][:, :, ::-1], bits)
    return root, gts


def u8(t: torch.Tensor) -> np.ndarray:
    return np.round(t.numpy() * 255.0).astype(np.int64)


def cfg_for(root, loader, **kw):
    d = dict(resize=[W, H], crop=16, batch_size=4, loader=loader)
    if (root / "test_lq").is_dir():  # image pairs
        d.update(dataset="pairs", test_lq_root=str(root / "test_lq"), test_gt_root=str(root / "test_gt"),
                 test_scenes=None, resize=None)
    d.update(kw)
    return make_cfg(root, **d)


def run_epoch(loader) -> list[dict]:
    return list(loader)


@pytest.mark.parametrize("loader", LOADERS)
def test_alignment_crop_and_flips(aligned, loader):
    root, gts = aligned
    ld = build_loader(cfg_for(root, loader), "train", seed=11)
    plans = ld.plan(0)
    batches = run_epoch(ld)
    assert len(batches) == len(ld) == len(TRAIN) * FRAMES // 4
    flips_seen = set()
    for batch, plan in zip(batches, plans, strict=True):
        assert batch["lq"].shape == (4, 3, 16, 16) and batch["lq"].dtype == torch.float32
        lq, gt = u8(batch["lq"]), u8(batch["gt"])
        for j, (scene, frame) in enumerate(zip(batch["scene"], batch["frame"], strict=True)):
            assert (lq[j] == gt[j] // 4 + offset(scene, frame)).all(), (scene, frame)
            # and the GT crop is exactly the planned crop + flips of the scene's GT, in RGB
            x, y, hf, vf = int(plan.x[j]), int(plan.y[j]), bool(plan.hflip[j]), bool(plan.vflip[j])
            ref = gts[scene][y : y + 16, x : x + 16, ::-1]
            ref = ref[:, ::-1] if hf else ref
            ref = ref[::-1] if vf else ref
            assert (gt[j] == ref.transpose(2, 0, 1)).all()
            flips_seen.add((hf, vf))
    assert len(flips_seen) >= 3  # the flips really vary (p = 0.5 each, 12 samples)
    for b in build_loader(cfg_for(root, loader), "test"):
        assert b["scene"] == ["t9"] and b["lq"].shape == (1, 3, H, W)
        assert (u8(b["lq"]) == u8(b["gt"]) // 4 + offset("t9", b["frame"][0])).all()


@pytest.mark.parametrize("loader", LOADERS)
def test_two_shards_cover_each_training_frame_once(aligned, loader):
    root, _ = aligned
    cfg = cfg_for(root, loader)
    seen = []
    for rank in (0, 1):
        ld = build_loader(cfg, "train", rank=rank, world_size=2, seed=3)
        assert len(ld) == 3
        for b in ld:
            assert len(b["scene"]) == 2 and b["lq"].shape[0] == 2  # global 4 over 2 ranks
            seen += list(zip(b["scene"], b["frame"], strict=True))
    assert sorted(seen) == [(s, f"{k:04d}") for s in TRAIN for k in range(FRAMES)]
    tests = [b["frame"][0] for r in (0, 1) for b in build_loader(cfg, "test", rank=r, world_size=2)]
    assert sorted(tests) == ["0000", "0001", "0002"]


def test_partial_batch_dropped_and_sharding_rules():
    d = epoch_draws(10, seed=1, epoch=0, size=(48, 32), crop=16, flips=True)
    r0, r1 = (train_batches(d.order, 4, 2, r) for r in (0, 1))
    assert r0.shape == r1.shape == (2, 2)  # 10 // 4 = 2 global batches, 2 samples left out
    used = np.concatenate([r0.ravel(), r1.ravel()])
    assert len(set(used.tolist())) == 8
    assert d.x.min() >= 0 and d.x.max() <= 48 - 16 and d.y.max() <= 32 - 16
    d1 = epoch_draws(10, seed=1, epoch=1, size=(48, 32), crop=16, flips=True)
    assert not np.array_equal(d.order, d1.order)  # a new permutation each epoch
    same = epoch_draws(10, seed=1, epoch=0, size=(48, 32), crop=16, flips=True)
    assert all(np.array_equal(a, b) for a, b in zip(vars(d).values(), vars(same).values(), strict=True))
    nof = epoch_draws(10, seed=1, epoch=0, size=(48, 32), crop=16, flips=False)
    assert not nof.hflip.any() and not nof.vflip.any() and np.array_equal(nof.x, d.x)
    with pytest.raises(ValueError, match="divisible"):
        per_rank_batch(12, 5)


def test_global_batch_must_divide(aligned):
    root, _ = aligned
    with pytest.raises(ConfigError, match=r"batch_size=4 .*world size 3"):
        build_loader(cfg_for(root, "torch"), "train", rank=0, world_size=3)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["scene"] == y["scene"]
        and x["frame"] == y["frame"]
        and torch.equal(x["lq"], y["lq"])
        and torch.equal(x["gt"], y["gt"])
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("loader", LOADERS)
def test_deterministic_for_a_seed_and_crops_vary(aligned, loader):
    root, _ = aligned
    cfg = cfg_for(root, loader)
    a = build_loader(cfg, "train", seed=5)
    e0, e1 = run_epoch(a), run_epoch(a)  # iterating again moves to epoch 1
    assert a.state_dict() == {"epoch": 2, "batch": 0}
    assert _same(e0, run_epoch(build_loader(cfg, "train", seed=5)))
    assert not _same(e0, run_epoch(build_loader(cfg, "train", seed=6)))
    # The same frame gets a different crop in the next epoch (GT crops compared per frame).
    crops = [{(s, f): g for b in e for s, f, g in zip(b["scene"], b["frame"], b["gt"], strict=True)} for e in (e0, e1)]
    differ = sum(not torch.equal(crops[0][k], crops[1][k]) for k in crops[0])
    assert differ >= len(crops[0]) - 1
    anchors = {(int(p.x[j]), int(p.y[j])) for p in a.plan(0) for j in range(4)}
    assert len(anchors) >= 6  # crops differ across steps within an epoch too


@pytest.mark.parametrize("loader,workers", [("torch", 0), ("torch", 1), ("dali", 0)])
def test_exact_mid_epoch_resume(aligned, loader, workers):
    root, _ = aligned
    cfg = cfg_for(root, loader, num_workers=workers)
    a = build_loader(cfg, "train", seed=9)
    run_epoch(a)
    it = iter(a)
    head = [next(it), next(it)]
    state = a.state_dict()
    assert state == {"epoch": 1, "batch": 2}
    tail = list(it)
    assert a.state_dict() == {"epoch": 2, "batch": 0}
    b = build_loader(cfg, "train", seed=9)
    b.load_state_dict(state)
    assert _same(tail, run_epoch(b))
    # set_epoch restarts an epoch; a position at an epoch's end moves on to the next epoch.
    b.set_epoch(1)
    assert _same(head + tail, run_epoch(b))
    c = build_loader(cfg, "train", seed=9)
    c.load_state_dict({"epoch": 0, "batch": len(c)})
    assert _same(head + tail, run_epoch(c))
    with pytest.raises(ValueError, match="out of range"):
        c.load_state_dict({"epoch": 0, "batch": len(c) + 1})


def test_dali_matches_torch_with_resize(tmp_path):
    """Frames stored at other sizes (down- and up-scaled), BGR: same choices, same pixels to uint8 rounding."""
    rng = np.random.default_rng(5)
    shapes = {"a": (53, 37), "b": (20, 30), "c": (41, 70), "t": (53, 37)}
    lq = {s: [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for _ in range(4)] for s, hw in shapes.items()}
    write_tree(tmp_path, lq, {s: rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for s, hw in shapes.items()})
    write_list(tmp_path / "test.txt", ["t"])
    for split in ("train", "test"):
        out = {}
        for loader in LOADERS:
            cfg = make_cfg(tmp_path, resize=[40, 24], crop=16, batch_size=4, loader=loader)
            out[loader] = run_epoch(build_loader(cfg, split, seed=2))
        assert len(out["torch"]) == len(out["dali"]) == (3 if split == "train" else 4)
        diffs = []
        for x, y in zip(out["torch"], out["dali"], strict=True):
            assert x["scene"] == y["scene"] and x["frame"] == y["frame"]
            for key in ("lq", "gt"):
                d = (x[key] - y[key]).abs() * 255
                assert d.max() <= 1.0 + 1e-4  # at most one uint8 level, at rounding ties
                diffs.append(d.flatten())
        assert (torch.cat(diffs) > 0.5).float().mean() < 0.01


def test_dali_loader_is_dali_and_missing_dali_is_an_error(aligned, monkeypatch):
    """No silent fall-back: "dali" gives the DALI loader, or an error naming why DALI cannot be imported."""
    from lfpv_fast.pipelines import dali

    root, _ = aligned
    assert isinstance(build_loader(cfg_for(root, "dali"), "train"), dali.DaliPairLoader)
    monkeypatch.setattr(dali, "HAVE_DALI", False)
    monkeypatch.setattr(dali, "DALI_IMPORT_ERROR", "ImportError: libcudart.so.12: cannot open shared object file")
    with pytest.raises(ConfigError, match=r"data.loader is 'dali' but nvidia.dali cannot be imported "
                                          r"\(ImportError: libcudart.so.12.*data.loader=torch"):
        build_loader(cfg_for(root, "dali"), "train")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_gpu_device_without_cuda_is_an_error(aligned):
    root, _ = aligned
    with pytest.raises(ConfigError, match="no CUDA device"):
        build_loader(cfg_for(root, "dali", device="gpu"), "train")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dali_gpu_matches_cpu(aligned):
    root, _ = aligned
    cpu = run_epoch(build_loader(cfg_for(root, "dali"), "train", seed=4))
    gpu = run_epoch(build_loader(cfg_for(root, "dali", device="gpu"), "train", seed=4))
    for x, y in zip(cpu, gpu, strict=True):
        assert y["lq"].is_cuda and x["scene"] == y["scene"]
        assert torch.equal(x["lq"], y["lq"].cpu()) and torch.equal(x["gt"], y["gt"].cpu())


# ---------------------------------------------------------------------------------------------
# pipelines/ on its own: plain inputs, no config, no data layer


class BrokenFrame(ValueError):
    """A reader's own error type."""


class NpyReader:
    """Reads pair i of a PairList with np.load; pair `broken` raises BrokenFrame (module level: workers pickle it
    where they spawn)."""

    def __init__(self, pairs, broken: int = -1) -> None:
        self.pairs, self.broken = pairs, broken

    def __call__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i == self.broken:
            raise BrokenFrame(f"{self.pairs.lq[i]}: broken frame")
        return np.load(self.pairs.lq[i]), np.load(self.pairs.gt[i])


def test_the_loaders_take_plain_inputs_and_the_readers_error_passes_through(tmp_path):
    from lfpv_fast.pipelines import LoaderError, PairList, dali
    from lfpv_fast.pipelines.torch_loader import TorchPairLoader

    rng = np.random.default_rng(3)
    lq, gt = [], []
    for k in range(6):  # BGR on disk, as SMID stores it
        for side, names in (("lq", lq), ("gt", gt)):
            names.append(str(tmp_path / f"{side}{k}.npy"))
            np.save(names[-1], rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    pairs = PairList(lq, gt, scene=["s"] * 6, frame=[str(k) for k in range(6)], sizes=[(W, H)] * 6, bgr=True)
    common = dict(split="train", crop=16, global_batch=2, flips=True, seed=1)
    loader = TorchPairLoader(pairs, NpyReader(pairs), **common)
    plans = loader.plan(0)
    torch_batches = run_epoch(loader)
    assert len(torch_batches) == 3
    for batch, plan in zip(torch_batches, plans, strict=True):
        for j, i in enumerate(plan.indices):
            x, y = int(plan.x[j]), int(plan.y[j])
            ref = np.load(lq[i])[y : y + 16, x : x + 16, ::-1]  # the crop, in RGB
            ref = ref[:, ::-1] if plan.hflip[j] else ref
            ref = ref[::-1] if plan.vflip[j] else ref
            assert batch["frame"][j] == str(i) and (u8(batch["lq"])[j] == ref.transpose(2, 0, 1)).all()
    if dali.HAVE_DALI:  # the DALI loader reads the same files itself: the same batches
        assert _same(torch_batches, run_epoch(dali.DaliPairLoader(pairs, num_threads=1, **common)))
    # The reader's error reaches the caller as its own type and one line, from a worker process too.
    first = int(plans[0].indices[0])  # the first pair the epoch reads
    for workers in (0, 1):
        loader = TorchPairLoader(pairs, NpyReader(pairs, broken=first), error=BrokenFrame, num_workers=workers,
                                 **common)
        with pytest.raises(BrokenFrame) as info:
            run_epoch(loader)
        assert str(info.value) == f"{lq[first]}: broken frame"
    with pytest.raises(LoaderError, match="fewer than one global batch"):
        TorchPairLoader(pairs, NpyReader(pairs), **{**common, "global_batch": 8})
    with pytest.raises(ValueError, match="one entry per pair"):
        PairList(lq, gt[:5], scene=["s"] * 6, frame=[str(k) for k in range(6)], sizes=[(W, H)] * 6)

