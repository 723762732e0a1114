"""Trimming memory-mapped weight files from the resident set (issue #19): what is dropped, what is never touched.

Oracle: /proc/self/smaps (the kernel's count of each mapping's resident pages) and the file's own bytes.
"""
from __future__ import annotations

import mmap
import time
from pathlib import Path

import numpy as np
import pytest

from diffrt.runtime.engines.residency import (
    TRIM_INTERVAL_S,
    resident_bytes,
    shared_readonly_mappings,
    trim,
    trimming,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
SIZE = 8 << 20  # 8 MiB: far above the page-granular noise of a few KiB
MiB = 1 << 20


def weight_file(folder: Path) -> tuple[Path, np.ndarray]:
    data = np.random.default_rng(0).integers(0, 255, SIZE, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx_data"
    path.write_bytes(data.tobytes())
    return path, data


def touched(mapped: mmap.mmap) -> int:
    """Read every page (as a compiler reading the weights does); returns a checksum of the bytes."""
    return int(np.frombuffer(mapped, np.uint8).sum(dtype=np.int64))


def test_trim_drops_a_shared_read_only_mapping_from_the_resident_set_and_keeps_its_bytes(tmp_path: Path) -> None:
    path, data = weight_file(tmp_path / "unet")
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert touched(mapped) == int(data.sum(dtype=np.int64))
        assert resident_bytes([tmp_path]) >= SIZE - MiB
        assert [m.path for m in shared_readonly_mappings([tmp_path])] == [str(path.resolve())]
        assert trim([tmp_path]) >= SIZE
        assert resident_bytes([tmp_path]) < MiB
        # the mapping is intact: reading faults the same bytes back in
        assert touched(mapped) == int(data.sum(dtype=np.int64))
        assert resident_bytes([tmp_path]) >= SIZE - MiB


def test_trim_leaves_private_and_writable_mappings_and_other_folders_alone(tmp_path: Path) -> None:
    path, data = weight_file(tmp_path / "unet")
    elsewhere, _ = weight_file(tmp_path / "other")
    with path.open("r+b") as file, elsewhere.open("rb") as other, \
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as private, \
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_WRITE) as writable, \
            mmap.mmap(other.fileno(), 0, access=mmap.ACCESS_READ) as other_mapped:
        private[:4] = b"diff"  # a private copy that madvise(MADV_DONTNEED) would throw away
        touched(private), touched(writable), touched(other_mapped)
        before = resident_bytes([tmp_path])
        assert trim([tmp_path / "unet"]) == 0
        assert private[:4] == b"diff"
        assert resident_bytes([tmp_path]) >= before - MiB
        assert trim([tmp_path / "unet-other"]) == 0  # a sibling whose name starts alike is not under the folder


def test_trimming_drops_pages_read_while_the_body_runs(tmp_path: Path) -> None:
    path, _ = weight_file(tmp_path / "unet")
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with trimming([tmp_path], interval=0.01):
            touched(mapped)
            deadline = time.monotonic() + 100 * TRIM_INTERVAL_S
            while resident_bytes([tmp_path]) >= MiB and time.monotonic() < deadline:
                time.sleep(0.01)  # a compile releases the GIL as this does
            during = resident_bytes([tmp_path])
            touched(mapped)
        assert during < MiB
        assert resident_bytes([tmp_path]) < MiB  # and once more on the way out
