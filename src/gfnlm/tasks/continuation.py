"""Sentence continuation (paper §4.1, Fig. 3, Table B.1): next sentences that are likely and diverse.

X is a 1-3 sentence prompt from OpenWebText, Z the next sentence. The GFlowNet samples the tempered
target R(Z) = p_LM(Z . | X)^(1/T), 0 < T < 1, amortised over prompts: at T = 1 it is the LM itself,
with its fat tail of unlikely sentences; as T falls it concentrates on the likeliest ones without
collapsing onto one, as beam search does.

**The sentence.** Z is generated until it ends with ".", 1 to ``max_len`` tokens, "." forced after
``max_len`` (the release's 1 and 30). "." is the only way to end, and every "." ends: the action
space of ``gfnlm.sentence`` (its docstring says, per tokenizer, which tokens count as the end and
which are banned, in policy, reward and baselines alike).

**The prompt.** Every line of the release's ``prompts.txt`` ends with a space. Both tokenizers
write it as a token " " of its own, after which the LM must start a word without its usual
leading space, a state it rarely saw in training; the task strips it, so that Z starts with a
space-led word as in running text. A tokenizer that adds BOS (Gemma's) puts it before X.

**The reward** is log p_LM(Z . | X) under the base model (adapter off) restricted to the action
space, for every prefix in one teacher-forced pass (``LMStopReward`` with ``allowed_token_ids``),
divided by the reward temperature, which GFlowNet runs anneal linearly from 1 to ``reward_temp``.

**Evaluation**, the same for every method: N = ``eval_samples`` continuations of each held-out prompt
by the method's decoding rule (``gfnlm.decoding``); per prompt, the largest log p_LM(Z . | X)
(``max_log_likelihood``, the paper's y axis), the diversity 1 - mean pairwise cosine similarity of
sentence embeddings of the N texts with their periods removed (all-mpnet-base-v2 by default, the
paper's x axis), the mean log-likelihood and length, the share that ended before ``max_len``, the
number of distinct texts; then each averaged over prompts, with the forward tokens and seconds each
prompt cost. ``samples.jsonl`` holds every continuation with its log-likelihood.

Data: the first ``prompts_used`` lines (the release's 1000) of a text file with one prompt a line, or
of a Hugging Face dataset's ``text`` column; the first ``train_prompts`` (950) train, the rest are
held out (lines 951-1000; Appendix B shows lines 951, 952, 955 and 958).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gfnlm.config import setting
from gfnlm.data import read_lines
from gfnlm.decoding import RULES, DecodingRule, RuleName, TokenCounter, as_batch, decode
from gfnlm.metrics import embedding_diversity
from gfnlm.policy import Policy
from gfnlm.rewards import LMStopReward, terminal_values
from gfnlm.sentence import SENTENCE_END, allowed_tokens
from gfnlm.tasks.base import Task, TaskOptions
from gfnlm.trajectories import ActionSpace, Query

DATA_FILE = "../shared/data/openwebtext/prompts.txt"


@dataclass
class ContinuationOptions(TaskOptions):
    prompts_file: str = setting(DATA_FILE, "Prompts X, one a line (a text file), or a Hugging Face dataset with a "
                                           "'text' column.")
    prompts_used: int = setting(1000, "Use only the first this many prompts (the release's 1000).")
    train_prompts: int = setting(950, "The first this many of them train; the rest are held out for evaluation.")
    test_file: str | None = setting(None, "Prompts to evaluate on instead of the held-out ones (one a line).")
    eval_prompts: int | None = setting(None, "Evaluate on the first this many prompts only.")
    max_len: int = setting(30, "Most tokens of the sentence; '.' is forced after them (release: 30).")
    min_len: int = setting(1, "Fewest tokens before '.' may end the sentence.")
    reward_temp: float = setting(
        0.875, "T of the target R(Z) = p_LM(Z . | X)^(1/T): GFlowNet runs anneal the reward temperature linearly "
               "from 1 to T over reward_temp_horizon steps (paper: T in 0.8-0.95, Appendix B 0.875).")
    eval_samples: int = setting(8, "N: continuations per prompt for the metrics (diversity needs 2 or more).")
    decoding: RuleName = setting(
        "policy", f"How evaluation picks the continuations: {', '.join(RULES)} ('policy' samples the model as "
                  "given; gfnlm eval --method RULE sets it).")
    temperature: float = setting(0.8, "Temperature of the 'tempered' rule.")
    top_p: float = setting(0.95, "p of the 'nucleus' rule.")
    top_k: int = setting(50, "k of the 'top-k' rule.")
    beam_factor: int = setting(1, "Beam search keeps beam_factor x N beams and returns the best N (5: the paper's "
                                  "'5x compute' diverse beam search).")
    diversity_penalty: float = setting(1.0, "Diverse beam search: score subtracted per earlier group that chose the "
                                            "same token (the release's 1.0).")
    encoder: str = setting("all-mpnet-base-v2", "Sentence encoder of the diversity metric: all-mpnet-base-v2 (the "
                                                "paper's), all-MiniLM-L6-v2 (light), or any sentence-transformers "
                                                "name or folder.")
    eval_batch_prompts: int = setting(8, "Prompts per sampling batch in evaluation.")
    eval_seed: int = setting(0, "Seed of the evaluation samples.")


class ContinuationTask(Task):
    name = "continuation"
    Options = ContinuationOptions
    options: ContinuationOptions
    summary_keys = ("max_log_likelihood", "diversity", "mean_log_likelihood", "mean_length", "n_prompts")
    train_methods = ("gfn", "grpo")
    eval_methods = tuple(rule for rule in RULES if rule != "policy")

    def __init__(self, options: ContinuationOptions, tokenizer):
        super().__init__(options, tokenizer)
        o = options
        if o.eval_prompts is not None and o.eval_prompts < 1:
            raise ValueError(f"eval_prompts must be at least 1, got {o.eval_prompts}")
        if o.eval_samples < 2:
            raise ValueError(f"eval_samples must be at least 2 (diversity compares samples), got {o.eval_samples}")
        if not 0 < o.reward_temp:
            raise ValueError(f"reward_temp must be positive, got {o.reward_temp}")
        if not 0 < o.train_prompts <= o.prompts_used:
            raise ValueError(f"need 0 < train_prompts <= prompts_used, got {o.train_prompts} and {o.prompts_used}")
        DecodingRule(o.decoding, beam_factor=o.beam_factor)  # a bad rule fails here
        prompts = [line.rstrip() for line in read_lines(o.prompts_file)[: o.prompts_used]]
        self.train_prompts, self.held_out = prompts[: o.train_prompts], prompts[o.train_prompts :]
        if o.test_file is not None:  # a bad test file fails before any work
            self.held_out = [line.rstrip() for line in read_lines(o.test_file)]
        if not self.held_out:
            raise ValueError(f"no prompts to evaluate: {o.prompts_file} has {len(prompts)} of the {o.prompts_used} used, "
                             f"all for training")
        self.stop_ids, self.allowed_ids = allowed_tokens(tokenizer)

    @classmethod
    def method_settings(cls, method: str, settings: dict) -> dict:
        """GFlowNet runs get the release's settings (Appendix B; LoRA r 64 / alpha 16 without dropout,
        lr 1e-4 after 20 warm-up steps, 25 % replay / 50 % tempered at 0.5-2, a buffer of 50 per prompt,
        the reward temperature annealed from 1 to ``reward_temp`` over 750 steps, 32 prompts x 8 samples);
        the experiment script scales the budget. The empty sentence cannot end, so SubTB learns each
        prompt's log Z, starting at its first estimate (log of a sum of p^(1/T) < 1 over sentences, far
        below 0 for T < 1). Any other method is a decoding rule."""
        if method == "gfn":
            final = float(settings.get("reward_temp", ContinuationOptions.reward_temp))
            return {"reward_temp_start": 1.0, "reward_temp_end": final, "reward_temp_horizon": 750,
                    "lora_rank": 64, "lora_alpha": 16, "lora_dropout": 0.0, "lr": 1e-4, "warmup_steps": 20,
                    "queries_per_step": 32, "samples_per_query": 8, "p_replay": 0.25, "p_tempered": 0.5,
                    "pf_temp_min": 0.5, "pf_temp_max": 2.0, "buffer_capacity": 50, "log_z_init": "estimate"}
        return {"decoding": method} if method in RULES else {}

    # ----------------------------------------------------------------- the engine's inputs
    def train_queries(self) -> list[Query]:
        return [Query(prompt) for prompt in self.train_prompts]

    def action_space(self) -> ActionSpace:
        return ActionSpace(self.stop_ids, self.options.max_len, self.options.min_len, self.allowed_ids)

    def reward(self, policy: Policy) -> LMStopReward:
        """The base model's own distribution over one sentence: the policy's action space, its adapter off."""
        return LMStopReward(policy)

    def prepare_base_model(self, model):
        """Refuses prompts that, with a whole sentence after them, would not fit the model's context."""
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None:
            for prompt in self.train_prompts + self.held_out:
                length = len(self.tokenizer(prompt)["input_ids"]) + self.options.max_len + 1
                if length > limit:
                    raise ValueError(f"the prompt {prompt[:60]!r}... with a sentence of {self.options.max_len} tokens "
                                     f"needs {length} positions; the model has {limit}")
        return model

    # ----------------------------------------------------------------- evaluation
    def decoding_rule(self) -> DecodingRule:
        o = self.options
        temperature = o.temperature if o.decoding == "tempered" else 1.0
        return DecodingRule(o.decoding, temperature, o.top_p, o.top_k, o.beam_factor, o.diversity_penalty)

    def eval_label(self, method: str, adapter: str | None) -> str:
        if method == "gfn":
            return f"GFlowNet T={self.options.reward_temp:g}" if adapter else "sample"
        if method == "grpo" and adapter:
            return "GRPO (TRL)"
        return self.decoding_rule().label

    def test_prompts(self) -> list[str]:
        return self.held_out[: self.options.eval_prompts]

    def evaluate(self, policy: Policy, output_dir: Path | None = None, label: str = "model") -> dict:
        o = self.options
        prompts, rule = self.test_prompts(), self.decoding_rule()
        generator = torch.Generator().manual_seed(o.eval_seed)
        counter, started, samples = TokenCounter(policy.model), time.perf_counter(), []
        try:
            for start in tqdm(range(0, len(prompts), o.eval_batch_prompts), desc=f"decoding ({rule.label})",
                              unit="batch", leave=False):
                chunk = [Query(p) for p in prompts[start : start + o.eval_batch_prompts]]
                samples += decode(policy, chunk, rule, o.eval_samples, generator)
        finally:
            counter.remove()
        seconds, forward_tokens = time.perf_counter() - started, counter.total
        reward = self.reward(policy)
        per_prompt = [self._prompt_metrics(reward, records) for records in samples]
        result = {
            "label": label,
            "decoding": rule.label,
            **{key: float(statistics.mean(m[key] for m in per_prompt)) for key in per_prompt[0] if key != "samples"},
            "n_prompts": len(prompts),
            "eval_samples": o.eval_samples,
            "forward_tokens_per_prompt": forward_tokens / len(prompts),
            "seconds_per_prompt": seconds / len(prompts),
            "encoder": o.encoder,
            "max_len": o.max_len,
            "test_file": o.test_file or f"{o.prompts_file} (lines {o.train_prompts + 1}-{o.prompts_used})",
        }
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            lines = [json.dumps({"prompt": p, "continuations": m["samples"]}) + "\n" for p, m in zip(prompts, per_prompt)]
            (output_dir / "samples.jsonl").write_text("".join(lines))
        return result

    def _prompt_metrics(self, reward: LMStopReward, records) -> dict:
        """One prompt's N continuations: their log-likelihoods under the base model and the metrics."""
        from gfnlm.encoders import embed

        batch = as_batch(records, self.tokenizer, reward.policy.device)
        log_lik = terminal_values(reward(batch), batch).tolist()  # [N]
        texts = batch.generated_texts(self.tokenizer)
        lengths = batch.lengths.tolist()
        vectors = embed([t.replace(SENTENCE_END, "") for t in texts], self.options.encoder)
        return {
            "max_log_likelihood": max(log_lik),
            "diversity": embedding_diversity(vectors),
            "mean_log_likelihood": statistics.mean(log_lik),
            "mean_length": statistics.mean(lengths),
            "ended_fraction": statistics.mean(n < self.options.max_len for n in lengths),
            "distinct": len(set(texts)),
            "samples": [{"text": t + SENTENCE_END, "log_likelihood": round(v, 4), "tokens": n}
                        for t, v, n in zip(texts, log_lik, lengths)],
        }
