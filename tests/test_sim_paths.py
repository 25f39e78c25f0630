"""`moebal simulate` with bad paths: one line naming the file, exit 2, nothing written."""

import errno
import os

import numpy as np
import pytest

from moebal.cli import main

SMALL = ["--gpus", "8", "--experts", "16", "--steps", "2", "--layers", "1", "--tokens-per-gpu", "64",
         "--no-progress", "--sched-time-ms", "0", "--rebalance-every", "1", "--systems", "standard,lp_symmetric"]


def fails_naming(capsys, args, name):
    assert main(["simulate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moebal: error:") and name in err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_out_that_is_a_file_or_under_a_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("keep")
    fails_naming(capsys, SMALL + ["--out", str(f)], str(f))
    fails_naming(capsys, SMALL + ["--out", str(f / "sub")], str(f))
    assert f.read_text() == "keep" and os.listdir(tmp_path) == ["taken"]


def test_out_that_is_not_writable(tmp_path, capsys, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)  # root may write anywhere: fake it
    out = tmp_path / "a" / "b"
    fails_naming(capsys, SMALL + ["--out", str(out)], "not writable")
    assert not (tmp_path / "a").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        fails_naming(capsys, SMALL + ["--out", str(ro / "out")], str(ro))
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


def test_a_failed_plot_write_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    fails_naming(capsys, SMALL + ["--out", str(tmp_path)], str(tmp_path / "relative.png"))
    assert sorted(os.listdir(tmp_path)) == ["results.json"]  # written whole, before the plots


def _damaged_traces(tmp_path):
    counts = np.random.default_rng(0).integers(0, 64, size=(4, 1, 8, 16))
    good = tmp_path / "good.npz"
    np.savez(good, counts=counts, top_k=2)
    data = good.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    body = bytearray(data)
    body[100:140] = b"\0" * 40  # the array's bytes damaged, the zip directory intact
    (tmp_path / "damaged.npz").write_bytes(bytes(body))
    (tmp_path / "text.npz").write_text("not a trace\n")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    return ["truncated.npz", "damaged.npz", "text.npz", "other.npz", "missing.npz"]


def test_bad_traces_are_one_line_naming_the_file(tmp_path, capsys):
    out = tmp_path / "out"
    for name in _damaged_traces(tmp_path):
        fails_naming(capsys, ["--trace", str(tmp_path / name), "--out", str(out), *SMALL], name)
    assert not out.exists()
