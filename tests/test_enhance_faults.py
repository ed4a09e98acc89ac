"""enhance's exit statuses (README, Commands: 2 for a usage or input error, before anything is written; 1 for a
failure during the work) and a full disk: one `error:` line, no half-written or temporary files, earlier
outputs intact."""

from __future__ import annotations

import os

from PIL import Image

from helpers import assert_one_line_error, one_error_line, run, write_noise_png
from lfpv_fast import enhance as enhance_cli


def test_a_missing_checkpoint_is_an_error_even_when_every_output_exists(tmp_path, tiny_checkpoint, capsys):
    src = write_noise_png(tmp_path / "a.png", 16, 16, 0)
    out = tmp_path / "out"
    assert enhance_cli.main([str(src), "--checkpoint", str(tiny_checkpoint), "-o", str(out), "-q"]) == 0
    before = (out / "a.png").read_bytes()
    code, err = run(enhance_cli.main, [src, "--checkpoint", tmp_path / "nope.pth", "-o", out, "-q"], capsys)
    assert_one_line_error(code, err, "nope.pth does not exist")
    assert (out / "a.png").read_bytes() == before


def test_a_folder_as_checkpoint_is_named_as_a_folder(tmp_path, capsys):
    src = write_noise_png(tmp_path / "a.png", 16, 16, 0)
    (tmp_path / "run").mkdir()
    code, err = run(enhance_cli.main, [src, "--checkpoint", tmp_path / "run", "-o", tmp_path / "out"], capsys)
    line = assert_one_line_error(code, err, str(tmp_path / "run"), "is a folder", ".pth")
    assert "does not exist" not in line
    assert not (tmp_path / "out").exists()


def test_an_unreadable_image_exits_2(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    code, err = run(enhance_cli.main, [tmp_path / "photo.png", "--checkpoint", tiny_checkpoint, "-o",
                                       tmp_path / "out", "-q"], capsys)
    assert_one_line_error(code, err, "photo.png")
    assert not (tmp_path / "out").exists()


def test_a_failure_while_enhancing_exits_1(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from lfpv_fast.inference.enhancement import ImageEnhancer

    def out_of_memory(self, images, plan):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(ImageEnhancer, "enhance", out_of_memory)
    src = write_noise_png(tmp_path / "a.png", 16, 16, 0)
    code, err = run(enhance_cli.main, [src, "--checkpoint", tiny_checkpoint, "-o", tmp_path / "out", "-q"], capsys)
    assert code == 1 and "error: " in err and "out of memory" in err
    assert not (tmp_path / "out").exists()


def test_a_full_disk_stops_with_one_error_line_and_leaves_nothing_half_written(tmp_path, tiny_checkpoint, capsys,
                                                                              small_filesystem):
    out = small_filesystem(256)
    inputs = tmp_path / "in"
    inputs.mkdir()
    # An earlier run's output, and a filler that leaves too little room for the new ones.
    earlier = out / "earlier.png"
    write_noise_png(earlier, 32, 32, 9)
    earlier_bytes = earlier.read_bytes()
    stat = os.statvfs(out)
    free = stat.f_bavail * stat.f_frsize
    (out / "filler").write_bytes(b"\0" * (free - 40 * 1024))
    # The first output (about 12 KiB) fits, the second (about 48 KiB) does not; the third is never tried.
    write_noise_png(inputs / "a.png", 64, 64, 1)
    write_noise_png(inputs / "b.png", 128, 128, 2)
    write_noise_png(inputs / "c.png", 128, 128, 3)
    code, err = run(enhance_cli.main, [inputs, "--checkpoint", tiny_checkpoint, "-o", out, "-q"], capsys)
    assert code == 1, err
    one_error_line(err, "No space left on device", str(out / "b.png"))
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "earlier.png", "filler"]  # no temporary files
    assert earlier.read_bytes() == earlier_bytes
    with Image.open(out / "a.png") as done:
        done.load()  # complete
        assert done.size == (64, 64)
