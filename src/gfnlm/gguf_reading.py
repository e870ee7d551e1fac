"""Reading an embedded model's GGUF file into a plain float32 transformers model, about 3x faster.

transformers can read GGUF files itself (with the ``gguf`` package installed), but slowly: a
conversion of SmolLM2-135M took 42-46 s on 2 CPU cores, Gemma-3-270M 116 s. ``faster_gguf_reading``
patches two ``gguf`` functions for the duration of one read, which brings that to 13-14 s and 42 s
(measured 2026-12-02, transformers 5.24). The patch is confined to this module,
restored on exit even after an error, serialised by a lock, and any failure of the fast path
falls back to the stock reader, so it can slow a conversion down but never break it
(``tests/test_gguf_reading.py``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger("gfnlm")


class GGUFReadError(RuntimeError):
    """The GGUF file cannot become a plain float model (not a failure of the fast path: no fallback)."""


def read_gguf_model(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Read a GGUF file into a plain (de-quantised, float32) model and its tokenizer.

    Tries the faster path first (``faster_gguf_reading``) and falls back to transformers' stock
    path if that fails for any reason, so the speed-up can never break a conversion.
    """
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise GGUFReadError(
            "Converting an embedded model needs the 'gguf' package: pip install gguf"
        ) from None
    try:
        with faster_gguf_reading():
            return _read_gguf(gguf_path)
    except GGUFReadError:
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
        raise GGUFReadError(
            f"transformers kept {gguf_path.name} quantised ({', '.join(packed)}); it cannot be "
            f"converted to a plain float model."
        )
    return model, tokenizer


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def faster_gguf_reading() -> Iterator[None]:
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
