"""What the experiment scripts (``scripts/*_runs.py``) share: one ``gfnlm`` command per run folder, resumable."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gfnlm.config import ConfigError, parse_key_values

logger = logging.getLogger("gfnlm")

GRPO = ["--steps", "10000", "--queries_per_step", "4", "--samples_per_query", "8", "--lr", "1e-4",
        "--warmup_steps", "10", "--save_every", "10"]
"""TRL's GRPO beside a GFlowNet of 4 queries x 8 samples a step (its groups), stopped by the caller's
``--time_limit_minutes`` (the GFlowNet's time); lr 1e-4, as on random numbers (5e-4, the GFlowNets', suits a loss
scaled by the reward, not one normalised per group, which also makes a reward temperature irrelevant to it)."""


def run_command(argv: list[str], out: Path) -> None:
    """One ``gfnlm train`` / ``gfnlm eval`` into ``out``: skipped when its eval.json exists, resumed when
    its training has checkpoints."""
    from gfnlm.cli import main as gfnlm

    if (out / "eval.json").is_file():
        return
    resume = ["--resume"] if argv[0] == "train" and (out / "checkpoints").is_dir() else []
    logger.info("gfnlm %s", " ".join([*argv, "--output-dir", str(out), *resume]))
    if gfnlm([*argv, "--output-dir", str(out), *resume]) != 0:
        raise SystemExit(f"failed: gfnlm {' '.join(argv)}")


def settings_flags(parser: argparse.ArgumentParser, option: str, settings: list[str]) -> list[str]:
    """KEY=VALUE settings as command-line flags (--KEY VALUE); a malformed one is a usage error."""
    try:
        return [word for key, value in parse_key_values(settings).items() for word in (f"--{key}", value)]
    except ConfigError as error:
        parser.error(f"{option}: {error}")
