"""How a model runs for a block of code: without dropout (``eval_mode``), or as its base model (``adapter_disabled``).

Sampling, scoring, rewards and shared contexts all need them; they live here, below all of those.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Dropout (LoRA's included) off for the block; the model's previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def adapter_disabled(model):
    """Context in which ``model`` runs as its base model, with every adapter layer inside it off.

    ``model`` may be the peft wrapper or the plain model under it. peft injects its LoRA layers
    into the plain model in place, so a reward built before the trainer applies LoRA (the usual
    order) holds a model whose layers are the policy's. Switching off only a wrapper's adapter
    would then let the reward follow the policy it trains: the policy raises its own reward
    instead of matching the base model's. No-op for a model without adapters.
    """
    if hasattr(model, "disable_adapter"):  # the peft wrapper
        with model.disable_adapter():
            yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
