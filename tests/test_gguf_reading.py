"""The faster GGUF reading: same data as gguf's own reader, patches undone, a failure falls back."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from gfnlm import gguf_reading
from gfnlm.gguf_reading import GGUFReadError, faster_gguf_reading, read_gguf_model


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("test.count", 7)
    writer.add_tensor("weights", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("bias", np.linspace(-1, 1, 5).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _contents(reader) -> dict:
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    fields = {name: field.parts[field.data[0]].tolist() for name, field in reader.fields.items() if field.data}
    return {"tensors": tensors, "fields": fields}


def test_patched_reader_reads_the_same_data_as_the_stock_reader(gguf_file: Path) -> None:
    stock = _contents(gguf.GGUFReader(gguf_file))
    with faster_gguf_reading():
        first = gguf.GGUFReader(gguf_file)
        assert gguf.GGUFReader(str(gguf_file)) is first  # one parse per file, shared by every caller
        assert not isinstance(first.data, np.memmap)  # slices of a plain array, not of the memmap
        patched = _contents(first)
    assert patched["fields"] == stock["fields"]
    assert patched["tensors"].keys() == stock["tensors"].keys()
    for name, values in stock["tensors"].items():
        np.testing.assert_array_equal(patched["tensors"][name], values)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert name_map.get_name("model.layers.0.self_attn.q_proj") == "blk.0.attn_q"


def test_patches_are_undone_after_the_block_even_after_an_error(gguf_file: Path) -> None:
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with pytest.raises(RuntimeError, match="boom"):
        with faster_gguf_reading():
            assert gguf.GGUFReader is not reader_class
            raise RuntimeError("boom")
    assert gguf.GGUFReader is reader_class and gguf.get_tensor_name_map is name_map
    assert isinstance(gguf.GGUFReader(gguf_file).data, np.memmap)  # the stock reader again


def test_a_failing_fast_path_falls_back_to_the_stock_reader(monkeypatch, caplog, tmp_path: Path) -> None:
    calls = []

    def read(path: Path):
        calls.append(gguf.GGUFReader is gguf_reading_stock_reader)
        if len(calls) == 1:
            raise KeyError("something the patched reader trips over")
        return "model", "tokenizer"

    gguf_reading_stock_reader = gguf.GGUFReader
    monkeypatch.setattr(gguf_reading, "_read_gguf", read)
    assert read_gguf_model(tmp_path / "x.gguf") == ("model", "tokenizer")
    assert calls == [False, True]  # first under the patch, then with gguf's own reader
    assert "using the stock reader" in caplog.text


def test_a_file_that_cannot_become_a_float_model_is_not_retried(monkeypatch, tmp_path: Path) -> None:
    calls = []

    def read(path: Path):
        calls.append(path)
        raise GGUFReadError("kept quantised")

    monkeypatch.setattr(gguf_reading, "_read_gguf", read)
    with pytest.raises(GGUFReadError, match="kept quantised"):
        read_gguf_model(tmp_path / "x.gguf")
    assert len(calls) == 1
