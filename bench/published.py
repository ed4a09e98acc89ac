"""The published LFPVs code as the benchmarks' baseline, run from a clone the user fetched.

    python bench/bench_train.py --published ~/src/LFPVS_ICCV      # or LFPV_PUBLISHED=~/src/LFPVS_ICCV

Nothing of the published code is in this repository: this module imports it from the given folder
(its own module paths: `models.archs.low_light_transformer`, `models.loss`, `data.dataset_SMID_train`)
and runs it as its training script would, with three run-time adjustments that change no numbers:

- on a machine without CUDA, `Tensor.cuda()` and `Module.cuda()` return the object itself (the
  published forward moves an unused position grid to the GPU with `.cuda()`);
- when torchvision is missing, an empty stand-in module is registered so that `models/loss.py`
  imports (torchvision only serves its VGG19 perceptual loss, which needs downloaded weights and is
  off on both sides of every comparison);
- its training dataset reads `./test_list.txt` from the working directory: it is built inside a
  temporary folder holding the benchmark's own list of test scenes.

Without a path, the rows that would run the published code are computed with lfpv_fast's reference
ops instead and labelled REFERENCE_LABEL, never "published".
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import torch

ENV = "LFPV_PUBLISHED"
REFERENCE_LABEL = "reference ops (numerically the published model)"
PUBLISHED_LABEL = "published code"
MODEL_FILE = Path("models/archs/low_light_transformer.py")
# The published SMID model (options/train/SMID.yml, network_G).
SMID_OPTIONS = dict(nf=64, nframes=5, groups=8, front_RBs=1, back_RBs=1, predeblur=True, HR_in=True, w_TSA=True)
TOP_LEVEL = ("models", "data", "utils", "options")


def add_argument(parser) -> None:
    """The --published option every benchmark takes."""
    parser.add_argument("--published", default=os.environ.get(ENV), metavar="PATH",
                        help=f"a clone of the published LFPVs code: its rows then run that code itself "
                             f"(default ${ENV}; without it those rows use our reference ops)")


@dataclass
class Published:
    """The published code's classes, imported from `root`."""

    root: Path
    model_class: type
    charbonnier_class: type
    dataset_class: type | None  # None when OpenCV (which the published data code needs) is missing
    dataset_error: str | None = None


def check_path(path: str | Path) -> Path:
    root = Path(path).expanduser()
    if not (root / MODEL_FILE).is_file():
        raise SystemExit(f"error: --published {path}: {root / MODEL_FILE} not found; expected a clone of the "
                         "published LFPVs repository")
    return root.resolve()


def _no_cuda_moves() -> None:
    """Make `.cuda()` a no-op where there is no CUDA (the published forward calls it on a CPU tensor)."""
    if torch.cuda.is_available() or getattr(torch.Tensor.cuda, "_lfpv_noop", False):
        return

    def tensor_cuda(self, *args, **kwargs):
        return self

    def module_cuda(self, *args, **kwargs):
        return self

    tensor_cuda._lfpv_noop = module_cuda._lfpv_noop = True
    torch.Tensor.cuda = tensor_cuda
    torch.nn.Module.cuda = module_cuda


def _torchvision_stand_in() -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        sys.modules["torchvision"] = types.ModuleType("torchvision")


def load(path: str | Path) -> Published:
    """Import the published model, loss and training dataset from a clone at `path`."""
    root = check_path(path)
    _no_cuda_moves()
    _torchvision_stand_in()
    for name in list(sys.modules):  # another tree's (or a stand-in's) modules of the same names
        if name.split(".")[0] in TOP_LEVEL:
            del sys.modules[name]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import importlib

    arch = importlib.import_module("models.archs.low_light_transformer")
    loss = importlib.import_module("models.loss")
    dataset_class, error = None, None
    try:
        dataset_class = importlib.import_module("data.dataset_SMID_train").VideoSameSizeDataset
    except ImportError as exc:  # cv2
        error = f"{exc} (pip install opencv-python-headless)"
    return Published(root, arch.low_light_transformer4, loss.CharbonnierLoss, dataset_class, error)


def from_args(args) -> Published | None:
    return load(args.published) if getattr(args, "published", None) else None


def build_model(pub: Published, original_state_dict: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The published SMID model, with the given weights (published key names), if any."""
    model = pub.model_class(**SMID_OPTIONS)
    if original_state_dict is not None:
        model.load_state_dict(original_state_dict, strict=True)
    return model


def snr_mask_as_published(lq: torch.Tensor, nf: torch.Tensor) -> torch.Tensor:
    """The mask of the published optimize_parameters/test, from the input and its 5x5 blur `nf`."""
    dark = lq[:, 0:1] * 0.299 + lq[:, 1:2] * 0.587 + lq[:, 2:3] * 0.114
    light = nf[:, 0:1] * 0.299 + nf[:, 1:2] * 0.587 + nf[:, 2:3] * 0.114
    mask = torch.div(light, torch.abs(dark - light) + 0.0001)
    peak = torch.max(mask.view(mask.shape[0], -1), dim=1)[0].view(-1, 1, 1, 1)
    return torch.clamp(mask * 1.0 / (peak + 0.0001), min=0, max=1.0).float()


class TrainStep:
    """One published training step: mask, forward, Charbonnier on both outputs, backward, Adam.

    As the published optimize_parameters, without its VGG term (see the module docstring).
    """

    def __init__(self, pub: Published, model: torch.nn.Module, lr: float = 4e-4, betas=(0.9, 0.99)) -> None:
        self.model = model.train()
        self.loss = pub.charbonnier_class()
        self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas)

    def __call__(self, lq: torch.Tensor, gt: torch.Tensor, nf: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad()
        mask = snr_mask_as_published(lq, nf)
        out, out_no_lfpv = self.model(lq, mask, x_gt=gt)
        loss = self.loss(out, gt) + self.loss(out_no_lfpv, gt)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def dataset(pub: Published, lq_root: Path, gt_root: Path, test_scenes: list[str], train_size: tuple[int, int],
            crop: int, flips: bool):
    """The published training dataset (full-size .npy, OpenCV resize per sample, crop, flips)."""
    if pub.dataset_class is None:
        raise RuntimeError(f"the published data code cannot be imported: {pub.dataset_error}")
    opt = {"name": "bench", "phase": "train", "cache_data": True, "N_frames": 5, "data_type": "img",
           "dataroot_GT": str(gt_root), "dataroot_LQ": str(lq_root), "train_size": list(train_size),
           "GT_size": crop, "LQ_size": crop, "use_flip": flips, "use_rot": flips}
    with tempfile.TemporaryDirectory() as tmp, _working_directory(tmp):
        Path(tmp, "test_list.txt").write_text("".join(f"{s}\n" for s in test_scenes))
        return pub.dataset_class(opt)


def loader(pub: Published, ds, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """As the published create_dataloader builds it for training on one GPU."""
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       drop_last=True, pin_memory=False)


@contextlib.contextmanager
def _working_directory(path: str | Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)
