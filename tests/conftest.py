"""Shared test setup: run Triton kernels under the CPU interpreter where there is no GPU.

This must happen before anything imports triton, which reads TRITON_INTERPRET when kernels are
launched and JIT-decorated; conftest.py is imported by pytest before any test module.
"""

import os

# Under pytest-xdist each worker takes its share of the cores for torch's threads, and so do the
# processes its tests start (they inherit OMP_NUM_THREADS). Two workers running two OpenMP threads each
# on two cores spin while they wait for a core: six torch-heavy test files took 170 s of CPU that way
# against 85 s, and the whole suite about 150 s more. Only in the workers: the controlling process's
# environment is theirs too.
_threads = None
if "PYTEST_XDIST_WORKER" in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    _threads = os.environ.setdefault("OMP_NUM_THREADS", str(_share))

import torch  # noqa: E402

if _threads is not None and _threads.isdigit():
    torch.set_num_threads(int(_threads))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def small_filesystem(tmp_path):
    """A factory for real, small filesystems: ``small_filesystem(size_kib)`` mounts a tmpfs of that size
    and returns its folder, so a test sees a genuine ENOSPC ("No space left on device") when it fills
    up. Unmounted at the end of the test. Needs root (CI runs as root); elsewhere the test is skipped
    and says why."""
    import subprocess

    mounts: list = []

    def make(size_kib: int):
        mount_point = tmp_path / f"small_fs_{len(mounts)}"
        mount_point.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={int(size_kib)}k", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs (needs root): {result.stderr.strip() or result.returncode}")
        mounts.append(mount_point)
        return mount_point

    yield make
    for mount_point in reversed(mounts):
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A weights-only checkpoint of the tests' small model (helpers.write_tiny_checkpoint: helpers.TINY, seed 0,
    reference backend, non-zero banks)."""
    from helpers import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth")



@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """The demo dataset (data.demo_root) of the tests of this process, built once: the training, evaluation and
    benchmark tests read it, none writes to it. Built here, not by the loaders, so that two torchrun ranks never
    build it at once."""
    from lfpv_fast.data.demo import dataset_is_current, make_demo_dataset

    root = tmp_path_factory.getbasetemp() / "lfpv-demo-data"
    if not dataset_is_current(root):
        make_demo_dataset(root)
    return root
