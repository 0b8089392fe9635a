"""Data from users' own pipelines (``--data module:callable`` / ``file.py:callable``) and
large tensor files read lazily (``.npy`` memory-mapped: only the samples used are read)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TinyNet, calibrate, make_batches

from bncheck.cli import cli
from bncheck.config import load_settings
from bncheck.reading.data import open_data
from bncheck.reading.data.pipeline import is_callable_spec
from bncheck.reading.data.tensors import MappedArray

PIPELINE = '''
import torch
from torch.utils.data import DataLoader, TensorDataset


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 3, 12, 12, generator=g), torch.randint(0, 5, (40,), generator=g)


def loader(batch_size=8):
    return DataLoader(TensorDataset(*data()), batch_size=batch_size)


def dicts():
    x, y = data()
    return [{"pixel_values": x[i:i + 8], "labels": y[i:i + 8]} for i in range(0, 40, 8)]


def generator():
    x, _ = data()
    return (x[i:i + 8] for i in range(0, 40, 8))


def broken():
    raise OSError("bucket not mounted")


def not_data():
    return 42
'''


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "pipeline.py"
    path.write_text(textwrap.dedent(PIPELINE))
    torch.manual_seed(0)
    torch.save(calibrate(TinyNet(), make_batches()).state_dict(), tmp_path / "tiny.pt")
    here = str(Path(__file__).parent)
    (tmp_path / "arch.py").write_text(f"import sys\nsys.path.insert(0, {here!r})\nfrom conftest import TinyNet\n\n"
                                      "def build():\n    return TinyNet()\n")
    return path


def run(tmp_path: Path, data: str, *extra: str):
    return CliRunner().invoke(cli, [
        "run", str(tmp_path / "tiny.pt"), "--arch", f"{tmp_path / 'arch.py'}:build", "--data", data,
        "--batch-size", "8", "--attribute", "0", "--json", "-", *extra,
    ])


def test_callable_specs_are_told_from_paths(tmp_path) -> None:
    assert is_callable_spec("pkg.data:make_loader") and is_callable_spec("path/to/data.py:loader")
    assert not is_callable_spec("images/") and not is_callable_spec(r"C:\data")
    (tmp_path / "a:b").mkdir()
    assert not is_callable_spec(str(tmp_path / "a:b"))  # a real path with a colon stays a path


def test_a_loader_from_a_file_gives_the_same_result_as_the_tensors(pipeline, tmp_path) -> None:
    from_pipeline = run(tmp_path, f"{pipeline}:loader")
    assert from_pipeline.exit_code in (0, 1), from_pipeline.output
    doc = json.loads(from_pipeline.stdout)
    sys.path.insert(0, str(pipeline.parent))
    try:
        import pipeline as module
    finally:
        sys.path.remove(str(pipeline.parent))
    torch.save(module.data(), tmp_path / "same.pt")
    reference = json.loads(run(tmp_path, str(tmp_path / "same.pt")).stdout)
    assert doc["data"]["samples"] == 32 and doc["data"]["labels"]
    assert "batches from your pipeline" in doc["data"]["preprocessing"]
    assert [la["score"] for la in doc["layers"]] == pytest.approx([la["score"] for la in reference["layers"]])
    assert doc["output"]["train_accuracy"] == reference["output"]["train_accuracy"]


def test_dict_batches_and_generators(pipeline, tmp_path) -> None:
    doc = json.loads(run(tmp_path, f"{pipeline}:dicts").stdout)
    assert doc["data"]["samples"] == 32 and doc["data"]["labels"]
    doc = json.loads(run(tmp_path, f"{pipeline}:generator", "--num-batches", "5").stdout)
    assert doc["data"]["samples"] == 40


def test_pipeline_errors_are_one_line(pipeline, tmp_path) -> None:
    for name, text in (("missing", "has no attribute 'missing'"),
                       ("broken", "calling it raised OSError: bucket not mounted"),
                       ("not_data", "returned int; return a DataLoader")):
        result = run(tmp_path, f"{pipeline}:{name}")
        assert result.exit_code == 3, result.output
        assert f"--data {pipeline}:{name}" in result.stderr and text in result.stderr
        assert "Traceback" not in result.output
    result = run(tmp_path, "no_such_module_xyz:loader")
    assert result.exit_code == 3 and "cannot import no_such_module_xyz" in result.stderr


def test_detection_style_batches_of_image_lists() -> None:
    """torchvision detection models take a list of differently sized images."""
    import torchvision

    import bncheck

    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [([torch.rand(3, 120, 160), torch.rand(3, 100, 140)], [{"boxes": torch.zeros(0, 4)}] * 2)
               for _ in range(2)]
    report = bncheck.analyze(model, batches, attribute=0)
    assert report.data.samples == 4 and report.data.input_shape == (3, 120, 160)
    assert report.layers and all(la.score is not None for la in report.layers if la.depth is not None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_npy_is_memory_mapped_and_only_used_rows_are_read(tmp_path) -> None:
    array = np.random.default_rng(0).normal(size=(1000, 3, 8, 8)).astype(np.float32)
    array[500:] = np.nan  # never read: the run uses the first 64 samples
    path = tmp_path / "big.npy"
    np.save(path, array)
    cfg = load_settings().data
    source = open_data(path, cfg, 16, 4)
    batches = list(source.batches())
    assert len(batches) == 4 and torch.equal(batches[0][0], torch.from_numpy(array[:16]))
    from bncheck.reading.data.tensors import _load_tensor_file

    inputs, _ = _load_tensor_file(path)
    assert isinstance(inputs, MappedArray) and isinstance(inputs.array, np.memmap)
    with pytest.raises(Exception, match="NaN/Inf"):
        open_data(path, cfg, 16, None)  # using every sample reaches the bad rows


def test_progress_bar_shows_rate_and_time_left() -> None:
    from bncheck.reporting.render.table import progress_bar

    with progress_bar(4, enabled=True, batch_size=8) as advance:
        for done in range(1, 5):
            advance("batches", done, None)
        advance("attribution", 0, 8)
        advance("attribution", 4, 8)


def test_parallel_decode_gives_the_same_batches_in_the_same_order(tmp_path, monkeypatch) -> None:
    """Threads decode, the next batch decodes ahead: the sample and its order are those of
    one image at a time, an unreadable file included (the next file takes its place)."""
    import shutil

    from conftest import SAMPLES

    import bncheck.reading.data.images as data_module

    folder = tmp_path / "images"
    shutil.copytree(SAMPLES / "data", folder)
    broken = sorted((folder / "1_square").iterdir())[0]
    broken.write_bytes(b"not an image")
    cfg = load_settings(SAMPLES / "config.yaml").data
    runs = {}
    for workers in (1, 4):
        monkeypatch.setattr(data_module, "DECODE_WORKERS", workers)
        source = open_data(folder, cfg, 32, None)
        runs[workers] = (list(source.batches()), list(source.skipped))
    (one, skipped_one), (four, skipped_four) = runs[1], runs[4]
    assert len(one) == len(four) == 8 and skipped_one == skipped_four and len(skipped_one) == 1
    for (x1, y1), (x4, y4) in zip(one, four):
        assert torch.equal(x1, x4) and torch.equal(y1, y4)


def test_prefetch_surfaces_errors_and_stops_early() -> None:
    from bncheck.reading.data.source import prefetched

    def source():
        yield 1
        yield 2
        raise OSError("disk gone")

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetched(source()):
            seen.append(item)
    assert seen == [1, 2]
    endless = prefetched(iter(range(10**9)))
    assert [next(endless) for _ in range(3)] == [0, 1, 2]
    endless.close()  # the producer thread stops instead of running on
