"""The export's memory preflight: the estimate from a component's weight files, the refusal before anything is
written when the machine has less memory available than the largest component needs, and the override.

Low memory is simulated by pointing the meminfo reader at a file written here (its `meminfo` argument, or
`preflight.MEMINFO` for a whole export); nothing else is replaced."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest

from diffrt.errors import ExportError
from diffrt.export import preflight
from diffrt.export.preflight import (
    FLOAT32_BYTES,
    MEMORY_BASE,
    SKIP_MEMORY_CHECK,
    VALIDATION_FACTOR,
    available_memory,
    check_memory,
    estimate_memory,
    folder_weights,
)


def write_weights(path: Path, **tensors: np.ndarray) -> Path:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_meminfo(path: Path, available_kb: int | None) -> Path:
    lines = ["MemTotal:       25165824 kB", "MemFree:         1000000 kB"]
    if available_kb is not None:
        lines.append(f"MemAvailable:   {available_kb:>8} kB")
    path.write_text("\n".join(lines + ["Buffers:           12345 kB"]) + "\n")
    return path


@pytest.fixture
def checkpoint(tmp_path: Path) -> dict[str, Path]:
    """Weight files keyed like `CheckpointSource.weight_files`: a two-shard transformer (1000 + 24 float32 values
    and an int64 tensor that is no parameter) and a smaller VAE."""
    root = tmp_path / "ck"
    return {
        "transformer/a.safetensors": write_weights(root / "transformer" / "a.safetensors",
                                                   w=np.zeros((10, 100), np.float32)),
        "transformer/b.safetensors": write_weights(root / "transformer" / "b.safetensors",
                                                   b=np.zeros(24, np.float32), ids=np.zeros(3, np.int64)),
        "vae/diffusion_pytorch_model.safetensors": write_weights(root / "vae" / "diffusion_pytorch_model.safetensors",
                                                                 w=np.zeros(100, np.float16)),
    }


@pytest.fixture(autouse=True)
def no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SKIP_MEMORY_CHECK, raising=False)


def test_the_estimate_is_the_larger_of_the_load_and_the_validation():
    assert FLOAT32_BYTES == 4
    # the load: the files' tensors and the float32 model made from them
    assert estimate_memory(1_000_000, 2_000_000, validate=False) == MEMORY_BASE + 2_000_000 + 4_000_000
    # ONNX Runtime's float32 session, when it is the larger
    assert estimate_memory(1_000_000, 2_000_000) == int(MEMORY_BASE + VALIDATION_FACTOR * 4_000_000)
    assert estimate_memory(1_000_000, 40_000_000) == estimate_memory(1_000_000, 40_000_000, validate=False)
    # the estimate grows with both counts
    assert estimate_memory(2, 4, validate=False) > estimate_memory(1, 4, validate=False)
    assert estimate_memory(1, 8, validate=False) > estimate_memory(1, 4, validate=False)


@pytest.mark.parametrize("values, file_bytes, validate, peak_mib", [
    (2_469_663_936, 4_939_434_191, False, 14_438),  # SD 3.5 medium's transformer, bf16 file, bf16 export
    (824_324_416, 1_648_679_418, True, 6_859),  # six of its blocks, fp32 export validated by ONNX Runtime
])
def test_the_estimate_covers_the_measurements_without_much_to_spare(values, file_bytes, validate, peak_mib):
    """docs/benchmarks.md, "Exporting SD 3.5 medium's transformer at its real size (CPU)"."""
    measured = peak_mib * 2**20
    assert measured <= estimate_memory(values, file_bytes, validate) <= 1.1 * measured


def test_weights_are_grouped_by_checkpoint_folder_and_only_the_exported_folders_count(checkpoint):
    sizes = {rel: path.stat().st_size for rel, path in checkpoint.items()}
    found = folder_weights(checkpoint, {"transformer", "vae"})
    assert found == {"transformer": (1024, sizes["transformer/a.safetensors"] + sizes["transformer/b.safetensors"]),
                     "vae": (100, sizes["vae/diffusion_pytorch_model.safetensors"])}
    assert folder_weights(checkpoint, {"vae"}) == {"vae": found["vae"]}


def test_available_memory_reads_memavailable(tmp_path):
    assert available_memory(write_meminfo(tmp_path / "meminfo", 2048)) == 2048 * 1024
    assert available_memory(write_meminfo(tmp_path / "old", None)) is None  # kernels before 3.14
    assert available_memory(tmp_path / "missing") is None  # not Linux


@pytest.mark.parametrize("validate, advice", [(True, "--no-validate"), (False, "--variant fp16")])
def test_refusal_names_the_largest_component_and_both_numbers(checkpoint, tmp_path, caplog, validate, advice):
    need = estimate_memory(*folder_weights(checkpoint, {"transformer"})["transformer"], validate)
    assert need > estimate_memory(*folder_weights(checkpoint, {"vae"})["vae"], validate)
    available_kb = (need - 200_000_000) // 1024
    meminfo = write_meminfo(tmp_path / "meminfo", available_kb)
    with caplog.at_level(logging.INFO, logger="diffrt.export.preflight"), pytest.raises(ExportError) as refused:
        check_memory(checkpoint, ["transformer", "vae"], validate, meminfo=meminfo)
    message = str(refused.value)
    assert message.startswith("not enough memory to export transformer: ")
    assert f"needs about {need / 1e9:.1f} GB" in message
    assert f"has {available_kb * 1024 / 1e9:.1f} GB available" in message
    assert advice in message and f"{SKIP_MEMORY_CHECK}=1" in message
    # what it needs is logged before the refusal
    assert re.search(r"the export needs about [\d.]+ GB of memory at its peak \(transformer: ", caplog.text)


def test_enough_memory_passes_and_logs_the_need(checkpoint, tmp_path, caplog):
    need = estimate_memory(*folder_weights(checkpoint, {"transformer"})["transformer"])
    meminfo = write_meminfo(tmp_path / "meminfo", need // 1024 + 1)
    with caplog.at_level(logging.INFO, logger="diffrt.export.preflight"):
        check_memory(checkpoint, ["transformer", "vae"], meminfo=meminfo)
    assert "the export needs about" in caplog.text


def test_the_environment_variable_skips_the_check(checkpoint, tmp_path, monkeypatch, caplog):
    meminfo = write_meminfo(tmp_path / "meminfo", 1)
    monkeypatch.setenv(SKIP_MEMORY_CHECK, "1")
    with caplog.at_level(logging.INFO, logger="diffrt.export.preflight"):
        check_memory(checkpoint, ["transformer"], meminfo=meminfo)
    assert f"{SKIP_MEMORY_CHECK} is set" in caplog.text
    monkeypatch.setenv(SKIP_MEMORY_CHECK, "0")  # "0" does not skip
    with pytest.raises(ExportError, match="not enough memory"):
        check_memory(checkpoint, ["transformer"], meminfo=meminfo)


def test_without_memavailable_the_check_is_skipped(checkpoint, tmp_path):
    check_memory(checkpoint, ["transformer"], meminfo=write_meminfo(tmp_path / "meminfo", None))
    check_memory(checkpoint, ["transformer"], meminfo=tmp_path / "no-such-file")


def test_an_export_that_cannot_fit_is_refused_before_any_output_folder(tiny_checkpoint, tmp_path, monkeypatch):
    from diffrt.export import export_pipeline

    monkeypatch.setattr(preflight, "MEMINFO", write_meminfo(tmp_path / "meminfo", 1024))  # 1 MiB available
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError, match=r"not enough memory to export (unet|text_encoder|vae): .* 0\.0 GB available"):
        export_pipeline(tiny_checkpoint("sd15"), out / "package")
    assert list(out.iterdir()) == []  # no package, no temporary folder beside it
    # the override lets the same export through
    monkeypatch.setenv(SKIP_MEMORY_CHECK, "1")
    export_pipeline(tiny_checkpoint("sd15"), out / "package", components=["vae_decoder"], validate=False)
    assert (out / "package" / "diffrt.json").is_file()
