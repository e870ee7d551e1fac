"""Tiny randomly initialised models and a character tokenizer, built in memory for unit tests."""

from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gfnlm.policy import Policy, native_bf16

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
needs_native_bf16 = pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="this CPU has no native bfloat16")
"""Parametrise a test over these to run it on a GPU too, where there is one (CI has none)."""

TINY_VOCAB = ["<pad>", "<s>", "</s>", *"0123456789", "+", "-", " "]  # 16 tokens


def make_char_tokenizer(chars: str = "".join(TINY_VOCAB[3:]), add_bos: bool = True,
                        merged: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """One token per character of ``chars`` (after <pad>, <s>, </s>), except the ``merged`` strings, one
    token each wherever they occur (as real BPE vocabularies merge " =,"); <s> prepended if ``add_bos``;
    decodes by concatenation."""
    vocab = [*TINY_VOCAB[:3], *chars, *merged]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<pad>"))
    pieces = "|".join([*(re.escape(m) for m in merged), "."])
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pieces), behavior="isolated")
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def make_tiny_lm(seed: int = 0, vocab_size: int = len(TINY_VOCAB), hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # larger logits than the default init, so that distributions are far from uniform
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()


def save_tiny_model(folder, tokenizer, seed: int = 2):
    """A tiny random LM for ``tokenizer`` and the tokenizer, saved as a model folder (for the command line)."""
    make_tiny_lm(vocab_size=len(tokenizer), seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_policy(model, tokenizer, space, tool=None, precision: str = "no", **settings) -> Policy:
    """``model`` as a policy, in float32 unless a test asks otherwise: most tests compare against float32 or
    float64 references."""
    return Policy(model, tokenizer, space, tool, precision=precision, **settings)


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_char_tokenizer()


@pytest.fixture
def tiny_lm() -> LlamaForCausalLM:
    return make_tiny_lm()


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run fastest on one thread (and suffer badly when threads compete for cores);
    integration tests with the embedded model keep torch's default."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
