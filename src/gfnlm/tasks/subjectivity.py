"""Subjectivity classification with latent rationales (paper §4.3, Table 3, Tables D.2-D.5).

A movie-review sentence X is objective or subjective (Y). The policy q(Z | X) writes a short
rationale Z after the paper's prompt (Table D.2)

    Classify this movie review as objective or subjective: "[X]" This review is [Z], so it is [Y].

and stops by writing "," (the first token of ", so it is [Y]."). Z is at most ``max_len`` word
tokens (letters, optionally after a space), so rationales read like Table D.5's, and by default
not the label words themselves (``rationale_excludes_labels``). The reward is
log p_LM(Z Y | X) under the base model, tempered by the Table D.3 schedule (1.2 -> 1.0 over
150 steps), with X and Y taken from the few labelled training examples.

Prediction for a new X (Bayesian model averaging): draw ``eval_samples`` rationales from q(Z | X);
after each, the answering LM picks the likelier of " objective." and " subjective." (the two
labels are the only answers, so this is the argmax of p_LM(Y | X Z)); the majority vote is the
prediction, ties going to the larger summed log-odds. The answering LM is the base model, or
after an EM M-step its fine-tuned adapter.

The paper samples Y from p_LM(Y | X Z); with two possible answers, taking the likelier one is the
deterministic version of that draw.

Without rationales (``rationales: false``, set for SFT and prompting) the same comparison is made
directly after "This review is", with ``shots`` labelled examples in context for few-shot prompting
(a cached ``SharedContext``; a tokenizer that adds a BOS token puts one before the context and
one before the prompt).

Data: JSON lines with ``text`` and ``label`` (0 objective, 1 subjective, or those words), or a
Hugging Face dataset name. The validation split is drawn from ``pool_file`` with a fixed seed,
never containing a training review; evaluation uses it unless ``test_file`` is given.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from gfnlm.baselines.sft import SFTTrainer
from gfnlm.config import ConfigError, TrainConfig, setting
from gfnlm.context import SharedContext, prompting_context
from gfnlm.data import read_rows, row_name
from gfnlm.exact import token_strings
from gfnlm.modes import adapter_disabled, eval_mode
from gfnlm.rewards import LMSuffixReward, lm_continuation_log_likelihoods
from gfnlm.policy import Policy
from gfnlm.sampling import encode_prompts, require_pad_token
from gfnlm.tasks.base import Task, TaskOptions, likelihood_weight_setting
from gfnlm.trainer import Trainer
from gfnlm.trajectories import ActionSpace, Query, Trajectories, TrajectoryRecord

DATA_DIR = "../shared/data/subj"
LABELS = ("objective", "subjective")
PROMPT = 'Classify this movie review as objective or subjective: "{text}" This review is'
INVERSE_PROMPT = 'This movie review is {label}: "{text}" In a few words, it is {label} because this review is'
"""Asks the base model why a review with a known label has it (inverse prompting, paper App. D)."""
RATIONALE_TOKEN = re.compile(r" ?[A-Za-z]+")
"""Text of a token a rationale may use: letters, optionally after a space."""
E_STEP_ADAPTER = "e_step"


def spells_label(token: str) -> bool:
    """Whether a word token is a label word, its start of 3+ letters ("subj", " Object") or a word
    built on it ("objectively"), which would let the rationale name the answer instead of giving a
    reason."""
    word = token.strip().lower()
    return len(word) >= 3 and any(label.startswith(word) or word.startswith(label) for label in LABELS)


@dataclass(frozen=True)
class Review:
    text: str  # X
    label: int  # Y: 0 objective, 1 subjective

    @property
    def label_text(self) -> str:
        return LABELS[self.label]

    def prompt(self) -> str:
        return PROMPT.format(text=self.text)

    def demonstration(self) -> str:
        """The labelled example as a few-shot demonstration (paper Table D.2, first prompt)."""
        return f"{self.prompt()} {self.label_text}.\n"


def load_reviews(source: str | Path) -> list[Review]:
    """Reviews from JSON lines / a JSON list / a Hugging Face dataset; a bad row is named."""
    return [_review_from_row(row, source, i) for i, row in enumerate(read_rows(source))]


def _review_from_row(row: dict, source: str | Path, index: int) -> Review:
    where = row_name(source, index)
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: missing or empty 'text'")
    label = row.get("label", row.get("label_text"))
    if isinstance(label, str) and label.strip().lower() in LABELS:
        return Review(text.strip(), LABELS.index(label.strip().lower()))
    if isinstance(label, str) and label.strip() in ("0", "1"):
        return Review(text.strip(), int(label))
    if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
        return Review(text.strip(), label)
    raise ValueError(f"{where}: label must be 0, 1, 'objective' or 'subjective', got {label!r}")


def validation_split(pool: list[Review], size: int, seed: int, exclude: set[str]) -> list[Review]:
    """``size`` reviews drawn from ``pool`` with ``seed``, none of whose text is in ``exclude``."""
    candidates = [r for r in pool if r.text not in exclude]
    if len(candidates) < size:
        raise ValueError(f"the pool has only {len(candidates)} reviews outside the training ones; asked for {size}")
    return random.Random(seed).sample(candidates, size)


@dataclass
class SubjectivityOptions(TaskOptions):
    train_size: int = setting(10, "Labelled training examples: reads train.{train_size}.jsonl (paper: 10, 20, 50).")
    train_file: str | None = setting(None, "Labelled reviews to train on (default: DATA_DIR/train.{train_size}.jsonl).")
    data_dir: str = setting(DATA_DIR, "Folder of train.jsonl and its 10/20/50-example subsets.")
    validation_size: int = setting(200, "Reviews in the validation split drawn from DATA_DIR/train.jsonl.")
    validation_seed: int = setting(0, "Seed of the validation split.")
    test_file: str | None = setting(None, "Reviews to evaluate on (default: the validation split).")
    eval_reviews: int | None = setting(None, "Evaluate on at most this many reviews.")
    rationales: bool = setting(
        True, "Classify through sampled rationales Z (GFlowNet, EM); false: directly after 'This review is' "
        "(prompting and SFT set this themselves).")
    rationale_excludes_labels: bool = setting(
        True, "The rationale may not use the label words, their first 3+ letters ('subj', 'object') or words "
        "built on them ('objectively'): with them, q(Z | X) can name the answer instead of giving a reason, "
        "and it did (Z = 'subjective', 'subject' or 'subj' for most samples of either class).")
    reward_likelihood_weight: float = likelihood_weight_setting(
        "v > 1 favours rationales after which the LM gives the true label more probability.")
    max_len: int = setting(5, "Most rationale tokens (Table D.3).")
    min_len: int = setting(1, "Fewest rationale tokens (Table D.3).")
    seed_buffer: bool = setting(True, "Seed the replay buffer with inverse-prompted rationales (Table D.4 ablation).")
    inverse_prompt_samples: int = setting(16, "Rationales proposed by inverse prompting per training review.")
    shots: int = setting(0, "Few-shot prompting: labelled training examples in context (at most train_size).")
    shot_seed: int = setting(0, "Seed of the shuffle of the few-shot examples.")
    eval_samples: int = setting(10, "Rationales drawn per review for the majority vote (1: no aggregation).")
    eval_temperature: float = setting(1.0, "Sampling temperature of the rationales in evaluation.")
    eval_batch_reviews: int = setting(32, "Reviews per evaluation batch.")
    m_step_samples: int = setting(16, "EM: rationales drawn from the E-step policy per training review.")
    balance_labels: bool = setting(
        False, "SFT and EM's M-step draw each label equally often, whatever its share of the training examples "
        "(the 10- and 20-example sets are 70 % and 65 % objective; SUBJ as a whole is balanced).")
    e_step_run: str | None = setting(None, "EM: the GFlowNet run (or adapter folder) whose policy gives the rationales.")
    top_rationales: int = setting(7, "Most frequent rationales per true label reported in eval.json (Table D.5).")
    eval_seed: int = setting(0, "Seed of the evaluation samples (training, inverse prompting and EM use `seed`).")


class SubjectivityTask(Task):
    name = "subjectivity"
    Options = SubjectivityOptions
    options: SubjectivityOptions
    summary_keys = ("accuracy", "n_reviews", "eval_samples")
    train_methods = ("gfn", "sft", "ppo", "grpo", "em")
    eval_methods = ("prompting",)

    def __init__(self, options: SubjectivityOptions, tokenizer):
        super().__init__(options, tokenizer)
        o = options
        for name in ("train_size", "validation_size", "eval_samples", "max_len", "inverse_prompt_samples",
                     "m_step_samples", "eval_batch_reviews", "eval_reviews"):
            if getattr(o, name) is not None and getattr(o, name) < 1:  # eval_reviews None: all of them
                raise ValueError(f"{name} must be at least 1, got {getattr(o, name)}")
        self.train = load_reviews(o.train_file or f"{o.data_dir}/train.{o.train_size}.jsonl")
        if not 0 <= o.shots <= len(self.train):
            raise ValueError(f"shots={o.shots}, but there are {len(self.train)} training examples")
        self._test_set = load_reviews(o.test_file) if o.test_file is not None else None  # fails before any work
        strings = token_strings(tokenizer)
        self.comma_ids = tuple(t for t, s in strings.items() if s == ",")
        self.period_ids = tuple(t for t, s in strings.items() if s == ".")
        if not self.comma_ids or not self.period_ids:
            raise ValueError("the tokenizer needs ',' and '.' tokens, which end the rationale and the answer")
        self.allowed_ids = tuple(t for t, s in strings.items() if RATIONALE_TOKEN.fullmatch(s)
                                 and not (o.rationale_excludes_labels and spells_label(s)))
        self._sft_records: list[TrajectoryRecord] | None = None  # built once: SFT draws from them every step
        if o.e_step_run:  # pinned to one checkpoint (and so saved in config.yaml): resuming the E-step run changes nothing
            from gfnlm.models import adapter_folder

            o.e_step_run = str(adapter_folder(o.e_step_run).resolve())

    @classmethod
    def method_settings(cls, method: str, settings: dict) -> dict:
        """For GFlowNet runs Table D.3's reward tempering (1.2 -> 1.0 over 150 steps) and behaviour-policy
        temperatures. Its learning rate, 5e-4, goes with LoRA rank 256 and alpha 16 (scale 1/16); our
        default LoRA (rank 16, alpha 32) has scale 2, hence 1e-4. log Z starts at its first estimate
        (log p(Z Y | X) is far below 0). SFT and prompting classify directly."""
        if method in ("sft", "prompting"):
            return {"rationales": False}
        if method == "gfn":
            return {"reward_temp_start": 1.2, "reward_temp_end": 1.0, "reward_temp_horizon": 150,
                    "pf_temp_min": 0.5, "pf_temp_max": 2.0, "lr": 1e-4, "log_z_init": "estimate"}
        return {}

    # ----------------------------------------------------------------- the engine's inputs
    def query(self, review: Review) -> Query:
        answer = f", so it is {review.label_text}." if self.options.rationales else f" {review.label_text}."
        return Query(review.prompt(), target=answer, meta={"label": review.label})

    def train_queries(self) -> list[Query]:
        return [self.query(r) for r in self.train]

    def action_space(self) -> ActionSpace:
        """The rationale policy: word tokens, stop at ",". Direct: the answer word, stop at "."."""
        if self.options.rationales:
            return ActionSpace(self.comma_ids, self.options.max_len, self.options.min_len, self.allowed_ids)
        return ActionSpace(self.period_ids, max_len=self._longest_answer(" {}") + 1, min_len=1)

    def lm_space(self) -> ActionSpace:
        """The whole LM over "Z, so it is Y" (EM's M-step): any token, ending at "."."""
        return ActionSpace(self.period_ids, max_len=self.options.max_len + self._longest_answer(", so it is {}") + 1,
                           min_len=1)

    def answer_ids(self, template: str) -> list[list[int]]:
        """The token ids of ``template`` filled with each label, e.g. ", so it is {}."."""
        return [self.tokenizer(template.format(label), add_special_tokens=False)["input_ids"] for label in LABELS]

    def _longest_answer(self, template: str) -> int:
        """Tokens of the longest label answer without its ".": the stop is never forced before "."."""
        return max(map(len, self.answer_ids(template)))

    def reward(self, policy: Policy) -> LMSuffixReward:
        return LMSuffixReward(policy, likelihood_weight=self.options.reward_likelihood_weight)

    def seed_records(self, policy: Policy, generator: torch.Generator) -> list[TrajectoryRecord]:
        """Rationales the base model proposes when told the label (inverse prompting, paper App. D)."""
        if not (self.options.rationales and self.options.seed_buffer):
            return []
        n = self.options.inverse_prompt_samples
        inverse = [Query(INVERSE_PROMPT.format(text=r.text, label=r.label_text)) for r in self.train for _ in range(n)]
        with adapter_disabled(policy.model):
            proposed = self._sample_records(policy, inverse, generator)
        policy_queries = [self.query(r) for r in self.train for _ in range(n)]
        prompts = encode_prompts(self.tokenizer, policy_queries)
        return [TrajectoryRecord(q, p, r.generated_ids, r.is_action)
                for q, p, r in zip(policy_queries, prompts, proposed)]

    def _sample_records(self, policy: Policy, queries: list[Query], generator: torch.Generator,
                        batch: int = 128) -> list[TrajectoryRecord]:
        """One rationale per query at temperature 1, in batches, in the rationale policy's action space."""
        records, rationales = [], policy.with_space(self.action_space())
        for start in range(0, len(queries), batch):
            records += rationales.sample(queries[start : start + batch], 1.0, generator).records()
        return records

    def sft_examples(self, n: int, generator: torch.Generator) -> list[TrajectoryRecord]:
        """Labelled pairs (X, Y) drawn uniformly; for EM's M-step, (X, Z Y) with Z from the E-step policy."""
        if self._sft_records is None:
            self._sft_records = self._direct_records()
        if not self.options.balance_labels:
            picks = torch.randint(len(self._sft_records), (n,), generator=generator).tolist()
            return [self._sft_records[i] for i in picks]
        by_label = [[r for r in self._sft_records if r.query.meta["label"] == y] for y in range(len(LABELS))]
        by_label = [records for records in by_label if records]  # a label with no examples cannot be drawn
        labels = torch.randint(len(by_label), (n,), generator=generator).tolist()
        return [by_label[y][torch.randint(len(by_label[y]), (1,), generator=generator).item()] for y in labels]

    def _direct_records(self) -> list[TrajectoryRecord]:
        if self.options.rationales:
            raise ValueError("SFT on labels classifies directly: set rationales to false (gfnlm sets it for --method sft)")
        queries = self.train_queries()
        prompts = encode_prompts(self.tokenizer, queries)
        words = self.answer_ids(" {}")
        return [TrajectoryRecord(q, p, words[r.label], [True] * len(words[r.label]))
                for q, p, r in zip(queries, prompts, self.train)]

    def trainer(self, method: str, policy: Policy, config: TrainConfig, ppo, output_dir: Path | None) -> Trainer:
        """``em``: the M-step, SFT of a second LoRA on log p(Z Y | X) for rationales of the E-step's policy."""
        if method != "em":
            return super().trainer(method, policy, config, ppo, output_dir)
        if not self.options.e_step_run:
            raise ConfigError("--method em needs --e_step_run GFN_RUN: the GFlowNet run whose policy gives the rationales")
        if config.lora_rank == 0:
            raise ConfigError("--method em trains a second LoRA adapter beside the E-step's: lora_rank must be > 0")
        trainer = SFTTrainer(policy.with_space(self.lm_space()), self.sft_examples, config, output_dir)
        self.prepare_m_step(trainer.policy, torch.Generator().manual_seed(config.seed))
        return trainer

    def prepare_m_step(self, policy: Policy, generator: torch.Generator) -> None:
        """EM: draw ``m_step_samples`` rationales per training review from the E-step policy, after
        which ``sft_examples`` trains the LM on log p(Z Y | X) for them (in ``lm_space``).

        ``policy`` is the M-step trainer's: its own fresh adapter is active; the E-step adapter is
        loaded beside it for the sampling and removed afterwards, leaving the trainable parameters as
        they were. (The paper writes log p(X Z Y); log p(X) does not depend on Z and is left out.)
        """
        n = self.options.m_step_samples
        with self.rationale_policy(policy.model):
            proposed = self._sample_records(policy, [self.query(r) for r in self.train for _ in range(n)], generator)
        policy.model.delete_adapter(E_STEP_ADAPTER)
        answers = self.answer_ids(", so it is {}")  # Y without its ".", the stop
        records = []
        for record in proposed:
            generated = record.generated_ids + answers[record.query.meta["label"]]
            records.append(TrajectoryRecord(record.query, record.prompt_ids, generated, [True] * len(generated)))
        self._sft_records = records

    # ----------------------------------------------------------------- evaluation
    def test_reviews(self) -> tuple[str, list[Review]]:
        o = self.options
        if self._test_set is not None:
            source, reviews = str(o.test_file), self._test_set
        else:
            pool_file = f"{o.data_dir}/train.jsonl"
            exclude = {r.text for size in (10, 20, 50) if Path(f"{o.data_dir}/train.{size}.jsonl").is_file()
                       for r in load_reviews(f"{o.data_dir}/train.{size}.jsonl")} | {r.text for r in self.train}
            reviews = validation_split(load_reviews(pool_file), o.validation_size, o.validation_seed, exclude)
            source = f"{pool_file} (validation split: {o.validation_size} reviews, seed {o.validation_seed})"
        return source, reviews[: o.eval_reviews]

    def few_shot_context(self, model) -> SharedContext | None:
        """``shots`` shuffled training examples before every prompt (few-shot prompting), cached once."""
        return prompting_context(model, self.tokenizer, self.train, self.options.shots, self.options.shot_seed)

    @contextlib.contextmanager
    def answering_model(self, model) -> Iterator[None]:
        """Run ``model`` as the LM that answers Y: itself when classifying directly (SFT), the base
        model after rationales, or the M-step adapter after EM."""
        if not self.options.rationales or self.options.e_step_run:
            yield
            return
        with adapter_disabled(model):
            yield

    @contextlib.contextmanager
    def rationale_policy(self, model) -> Iterator[None]:
        """Run ``model`` as q(Z | X): itself, or for EM the E-step adapter, loaded beside the M-step's."""
        if not self.options.e_step_run:
            yield
            return
        if not hasattr(model, "peft_config"):
            raise ValueError("an EM model is the M-step's adapter: evaluate it with --adapter EM_RUN")
        if E_STEP_ADAPTER not in model.peft_config:
            model.load_adapter(self.options.e_step_run, adapter_name=E_STEP_ADAPTER)
        answering = model.active_adapter
        model.set_adapter(E_STEP_ADAPTER, inference_mode=True)
        try:
            yield
        finally:
            model.set_adapter(answering)  # trainable again, as it was

    def label_log_probs(self, model, traj: Trajectories, context: SharedContext | None = None) -> Tensor:
        """log p_LM(Y_label | X Z) for both labels after each trajectory, under the answering LM: [N, 2]."""
        answers = self.answer_ids(", so it is {}." if self.options.rationales else " {}.")
        with self.answering_model(model), eval_mode(model):
            return lm_continuation_log_likelihoods(model, traj, answers, context).cpu()

    def evaluate(self, policy: Policy, output_dir: Path | None = None, label: str = "model") -> dict:
        o, model = self.options, policy.model
        source, reviews = self.test_reviews()
        samples = o.eval_samples if o.rationales else 1
        context = None if o.rationales else self.few_shot_context(model)
        generator = torch.Generator().manual_seed(o.eval_seed)
        predictions = []
        for start in tqdm(range(0, len(reviews), o.eval_batch_reviews), desc=f"evaluating {label}", unit="batch",
                          leave=False):
            chunk = reviews[start : start + o.eval_batch_reviews]
            queries = [Query(r.prompt()) for r in chunk for _ in range(samples)]
            if o.rationales:
                with self.rationale_policy(model):
                    traj = policy.sample(queries, o.eval_temperature, generator)
            else:
                records = [TrajectoryRecord(q, p, [], []) for q, p in zip(queries, encode_prompts(self.tokenizer, queries))]
                traj = Trajectories.from_records(records, require_pad_token(self.tokenizer), policy.device)
            rationales = [z.strip() for z in traj.generated_texts(self.tokenizer)] if o.rationales else [""] * len(queries)
            log_odds = self.label_log_probs(model, traj, context).diff(dim=1).squeeze(1)  # [N] subjective - objective
            for j, review in enumerate(chunk):
                rows = slice(j * samples, (j + 1) * samples)
                predictions.append(_vote(review, rationales[rows], log_odds[rows].tolist()))
        correct = sum(p["correct"] for p in predictions)
        result = {
            "label": label,
            "accuracy": correct / len(predictions),
            "n_reviews": len(predictions),
            "n_correct": correct,
            "test_file": source,
            "train_size": len(self.train),
            "shots": o.shots,
            "rationales": o.rationales,
            "eval_samples": samples,
            "eval_temperature": o.eval_temperature if o.rationales else None,
        }
        if o.rationales:
            result["top_rationales"] = top_rationales(predictions, o.top_rationales)
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
        return result


def _vote(review: Review, rationales: list[str], log_odds: list[float]) -> dict:
    """Majority vote of the per-rationale answers; a tie goes to the larger summed log-odds."""
    votes = [int(v > 0) for v in log_odds]
    subjective = sum(votes)
    if 2 * subjective == len(votes):
        prediction = int(sum(log_odds) > 0)
    else:
        prediction = int(2 * subjective > len(votes))
    return {
        "text": review.text,
        "label": review.label,
        "prediction": prediction,
        "correct": prediction == review.label,
        "rationales": rationales,
        "votes": votes,
        "log_odds": [round(v, 4) for v in log_odds],
    }


def top_rationales(predictions: list[dict], k: int) -> dict[str, list[dict]]:
    """The ``k`` most frequent rationales per true label with their share of that label's samples (Table D.5)."""
    by_label: dict[str, Counter] = defaultdict(Counter)
    for p in predictions:
        by_label[LABELS[p["label"]]].update(p["rationales"])
    out = {}
    for name, counts in sorted(by_label.items()):
        total = sum(counts.values())
        out[name] = [{"rationale": z, "frequency": c / total} for z, c in counts.most_common(k)]
    return out
