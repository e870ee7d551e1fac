"""Story infilling (paper §4.2, Table 2, Appendix C): the missing fourth sentence of a five-sentence story.

Given the beginning X (sentences 1-3) and the end Y (sentence 5), sample the middle Z from the
posterior p_LM(Z | X, Y) ∝ p_LM(X Z Y) of a story LM. Sampling Z after X alone ignores Y; the
GFlowNet learns to account for the ending.

**The story LM** (``--method story-lm``) is the embedded model fine-tuned on whole stories: LoRA on
the reward split (rows 1000-1870, 871 stories) and the training stories (rows 100-999), never on the
100 validation stories. LoRA rather than full fine-tuning because the saved story LM is then a small
adapter (the embedded model is converted locally, so a full copy of it would be a second 0.5 GB
folder per run), and a few hundred steps on CPU move it far enough (``story_log_likelihood`` in its
eval.json). Every other method names it with ``story_lm`` and ``prepare_base_model`` merges it into
the weights: "the base model" (the reward, the prompting and left-to-right baselines, the start of
the GFlowNet's and SFT's own LoRA) is then the story LM. Its examples are X = sentence 1 and the
rest of the story as the trajectory, ended by EOS: the rewards only need p(. | sentence 1 ...).

**The policy** writes Z after the prompt (Appendix C) ``Beginning: {X}\\n End: {Y}\\n Middle:``; the
paper's prompt ends with a space, which both embedded tokenizers write as a token of its own
before a word without its leading space (as in the continuation task), so the space is left to Z's
first word. Z is one sentence that can only end with "." (``gfnlm.sentence``), at least ``min_len``
and at most ``max_len`` tokens (Table C.2: 5 and 25), "." forced after ``max_len``. The paper lets Z
end at EOS too; here the sentence must end as the story's sentences do.

**The reward** is log p_storyLM(X Z. Y): the story in its own order, X, then Z with its period,
then a space and Y, scored for every prefix of Z in one batched pass (``LMSuffixReward`` with X as
the trajectory's context and ". Y" as the suffix after each prefix; ``StoryOrderReward``). The
paper's code glues Y to Z without a space and does not cut Z at the sentence end.

**Evaluation**, the same for every method: ``eval_samples`` infills (10) of each validation story at
``eval_temperature`` (0.9), each Z with its period, against the reference fourth sentence:
BERTScore F1 (``bert-score``; backbone and layer are settings, written into eval.json), BLEU-4 and
GLEU-4 as the paper's code computes them (nltk, whitespace tokens, x 100) with sacrebleu's BLEU as
a cross-check, the mean log p(Y | X Z) under the story LM (does the infill lead to the ending?),
distinct infills per story and mean length; each as mean ± std over the draws (draw k: the k-th
infill of every story). The offline BERTScore backbone is all-mpnet-base-v2 at layer 8 (bert-score's
layer for MPNet-base), rescaled by a baseline computed here from 500 pairs of sentences of unrelated
stories of the reward split; it is **not comparable** with Table 2's DeBERTa-xlarge-MNLI figures
(``--bertscore_model microsoft/deberta-xlarge-mnli`` where the hub is reachable).

Data: ``rocstories_cloze_val2016.csv`` (``storyid, sentence1..sentence5``), any CSV / JSON lines
with those columns, a Story Cloze file (``InputSentence1..4``, ``RandomFifthSentenceQuiz1/2``,
``AnswerRightEnding``), or a Hugging Face dataset name. Rows 0-99 validate, 100-999 train (900),
the rest fine-tune the story LM (with the training stories).
"""

from __future__ import annotations

import csv
import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gfnlm.baselines.sft import EpochDraws, SFTTrainer
from gfnlm.config import ConfigError, TrainConfig, setting
from gfnlm.data import read_rows, row_name
from gfnlm.metrics import BertScore, bleu4, gleu4, sacrebleu4
from gfnlm.models import load_adapter, stop_token_ids
from gfnlm.modes import adapter_disabled, eval_mode
from gfnlm.rewards import (
    LMSuffixReward,
    lm_continuation_log_likelihoods,
    policy_prefix_log_likelihoods,
    terminal_values,
)
from gfnlm.policy import Policy
from gfnlm.sampling import encode_prompts, text_records
from gfnlm.sentence import SENTENCE_END, allowed_tokens
from gfnlm.tasks.base import Task, TaskOptions
from gfnlm.trainer import Trainer
from gfnlm.trajectories import ActionSpace, Query, Trajectories, TrajectoryRecord

DATA_FILE = "../shared/data/stories/rocstories_cloze_val2016.csv"
PROMPT = "Beginning: {beginning}\n End: {ending}\n Middle:"


@dataclass(frozen=True)
class Story:
    sentences: tuple[str, str, str, str, str]

    @property
    def beginning(self) -> str:  # X
        return " ".join(self.sentences[:3])

    @property
    def middle(self) -> str:  # the reference Z
        return self.sentences[3]

    @property
    def ending(self) -> str:  # Y
        return self.sentences[4]


def load_stories(source: str | Path) -> list[Story]:
    """Five-sentence stories from a CSV / JSON (lines) file or a Hugging Face dataset; a bad row is named."""
    path = Path(source)
    if path.suffix == ".csv":
        if not path.is_file():
            raise ValueError(f"data file {path} does not exist")
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            raise ValueError(f"{source}: no rows")
    else:
        rows = read_rows(source)
    return [_story_from_row(row, source, i) for i, row in enumerate(rows)]


def _story_from_row(row: dict, source: str | Path, index: int) -> Story:
    where = row_name(source, index)
    if "InputSentence1" in row:  # the Story Cloze format: the right one of two endings
        answer = str(row.get("AnswerRightEnding", "")).strip()
        if answer not in ("1", "2"):
            raise ValueError(f"{where}: AnswerRightEnding must be 1 or 2, got {answer!r}")
        names = [f"InputSentence{i}" for i in range(1, 5)] + [f"RandomFifthSentenceQuiz{answer}"]
    else:
        names = [f"sentence{i}" for i in range(1, 6)]
    missing = [name for name in names if not str(row.get(name) or "").strip()]
    if missing:
        raise ValueError(f"{where}: missing or empty {', '.join(missing)}")
    return Story(tuple(str(row[name]).strip() for name in names))


@dataclass
class InfillingOptions(TaskOptions):
    stories_file: str = setting(DATA_FILE, "Five-sentence stories (CSV, JSON lines, Story Cloze CSV or a dataset name).")
    story_lm: str | None = setting(
        None, "The story LM (a run of --method story-lm, or its adapter): merged into the base model, it is the reward "
              "LM and what every method starts from. Without it the base model itself scores the stories.")
    validation_stories: int = setting(100, "The first this many stories validate (the paper's code: rows 0-99).")
    train_stories: int = setting(900, "The next this many train the infilling methods (rows 100-999); the rest, with "
                                      "them, fine-tune the story LM.")
    test_file: str | None = setting(None, "Stories to evaluate on instead of the validation stories.")
    eval_stories: int | None = setting(None, "Evaluate on the first this many stories only.")
    max_len: int = setting(25, "Most tokens of the infill Z; '.' is forced after them (Table C.2: 25).")
    min_len: int = setting(5, "Fewest tokens of Z before '.' may end it (Table C.2: 5).")
    infill_prompt: bool = setting(
        True, "Sample Z after the infilling prompt (Beginning / End / Middle); false: after X alone, in story order "
              "(--method left-to-right sets it).")
    eval_samples: int = setting(10, "Infills per story (draws).")
    eval_temperature: float = setting(0.9, "Sampling temperature of the infills in evaluation (Appendix C).")
    eval_batch_stories: int = setting(10, "Stories per sampling batch in evaluation.")
    eval_seed: int = setting(0, "Seed of the evaluation samples.")
    bertscore_model: str = setting("all-mpnet-base-v2", "BERTScore backbone: all-mpnet-base-v2 (offline), or e.g. "
                                                        "microsoft/deberta-xlarge-mnli (the paper's; needs the hub).")
    bertscore_layer: int | None = setting(None, "Its layer (default: 8 for all-mpnet-base-v2, bert-score's "
                                                "MPNet-base layer; bert-score's own for the backbones it knows).")
    bertscore_baseline_pairs: int = setting(500, "Pairs of unrelated sentences that give the rescaling baseline of a "
                                                 "backbone bert-score has none for.")


class StoryOrderReward:
    """log R(s_i ⊤) = log p(X z_1..z_i . Y): the policy's trajectories re-read in story order.

    The policy writes Z after its prompt, but the story LM scores the story itself: each trajectory's
    generated tokens are put after X (the query's ``meta['beginning']``), and ". Y" is scored after
    every prefix in one batched pass (``LMSuffixReward``).
    """

    def __init__(self, policy: Policy):
        self.tokenizer = policy.tokenizer
        self.suffix_reward = LMSuffixReward(policy, suffix=lambda q: f"{SENTENCE_END} {q.meta['ending']}")

    def story_order(self, traj: Trajectories) -> Trajectories:
        records = traj.records()
        contexts = encode_prompts(self.tokenizer, [Query(r.query.meta["beginning"]) for r in records])
        story = [TrajectoryRecord(r.query, x, r.generated_ids, r.is_action) for r, x in zip(records, contexts)]
        return Trajectories.from_records(story, self.tokenizer.pad_token_id, traj.input_ids.device)

    def __call__(self, traj: Trajectories) -> torch.Tensor:
        return self.suffix_reward(self.story_order(traj))

    def terminal(self, traj: Trajectories) -> torch.Tensor:
        return self.suffix_reward.terminal(self.story_order(traj))


class InfillingTask(Task):
    name = "infilling"
    Options = InfillingOptions
    options: InfillingOptions
    summary_keys = ("bertscore", "bleu4", "gleu4", "log_p_ending", "n_stories")
    train_methods = ("gfn", "sft", "grpo", "story-lm")
    eval_methods = ("prompting", "left-to-right")
    def __init__(self, options: InfillingOptions, tokenizer):
        super().__init__(options, tokenizer)
        o = options
        for name in ("eval_samples", "eval_batch_stories", "max_len"):
            if getattr(o, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(o, name)}")
        if not 0 <= o.min_len <= o.max_len:
            raise ValueError(f"need 0 <= min_len <= max_len, got {o.min_len} and {o.max_len}")
        stories = load_stories(o.stories_file)
        end = o.validation_stories + o.train_stories
        self.validation, self.train = stories[: o.validation_stories], stories[o.validation_stories : end]
        self.story_lm_stories = stories[end:]
        self.test = load_stories(o.test_file) if o.test_file is not None else self.validation
        if not self.train or not self.test:
            raise ValueError(f"{o.stories_file} has {len(stories)} stories: too few for {o.validation_stories} to validate "
                             f"and {o.train_stories} to train")
        self.stop_ids, self.allowed_ids = allowed_tokens(tokenizer)

    @classmethod
    def method_settings(cls, method: str, settings: dict) -> dict:
        """Table C.2 for GFlowNet runs (LoRA r 64 / alpha 16 / dropout 0.1, lr 1e-4, behaviour temperatures
        0.5-2, reward temperature 1.1 -> 0.85 over 100 steps, a buffer of 25 per story seeded with the true
        fourth sentences and replayed by reward, 16 stories x 64 samples; the experiment script scales the
        batch). SFT: lr 1e-4 (paper: 10 epochs). left-to-right samples Z after X alone."""
        if method == "gfn":
            return {"lora_rank": 64, "lora_alpha": 16, "lora_dropout": 0.1, "lr": 1e-4, "pf_temp_min": 0.5,
                    "pf_temp_max": 2.0, "reward_temp_start": 1.1, "reward_temp_end": 0.85, "reward_temp_horizon": 100,
                    "buffer_capacity": 25, "buffer_sampling": "reward", "queries_per_step": 16, "samples_per_query": 64,
                    "log_z_init": "estimate"}
        if method in ("sft", "story-lm"):
            return {"lr": 1e-4, "samples_per_query": 1}
        if method == "left-to-right":
            return {"infill_prompt": False}
        return {}

    def prepare_base_model(self, model):
        """The story LM (``story_lm``) merged into the weights, so that the base model is the story LM."""
        if self.options.story_lm is None:
            return model
        return load_adapter(model, self.options.story_lm).merge_and_unload()

    # ----------------------------------------------------------------- the engine's inputs
    def policy_prompt(self, story: Story) -> str:
        return PROMPT.format(beginning=story.beginning, ending=story.ending) if self.options.infill_prompt else story.beginning

    def query(self, story: Story) -> Query:
        return Query(self.policy_prompt(story), meta={"beginning": story.beginning, "ending": story.ending,
                                                      "reference": story.middle})

    def train_queries(self) -> list[Query]:
        return [self.query(s) for s in self.train]

    def action_space(self) -> ActionSpace:
        return ActionSpace(self.stop_ids, self.options.max_len, self.options.min_len, self.allowed_ids)

    def reward(self, policy: Policy) -> StoryOrderReward:
        return StoryOrderReward(policy)

    def reference_records(self, stories: list[Story]) -> list[TrajectoryRecord]:
        """Each story's true fourth sentence as the policy writes it (without its period, the stop)."""
        records = text_records(self.tokenizer, [(self.query(s), " " + s.middle.removesuffix(SENTENCE_END)) for s in stories])
        space = self.action_space()
        allowed = set(space.allowed_token_ids)
        kept = [r for r in records if space.min_len <= r.length <= space.max_len and set(r.generated_ids) <= allowed]
        if not kept:
            raise ValueError(f"none of the {len(stories)} fourth sentences fits the action space (one sentence of "
                             f"{space.min_len}-{space.max_len} allowed tokens ending with '.')")
        return kept

    def seed_records(self, policy: Policy, generator: torch.Generator) -> list[TrajectoryRecord]:
        """The training stories' true fourth sentences (Table C.2's seeded buffer), those the action space can write."""
        return self.reference_records(self.train)

    def trainer(self, method: str, policy: Policy, config: TrainConfig, ppo, output_dir: Path | None) -> Trainer:
        """SFT and ``story-lm`` (LoRA SFT of the model on whole stories of the reward and training splits) go over
        their data in epochs, as Table C.2 counts them: SFT on the training stories' (prompt, true fourth
        sentence), those the action space can write."""
        if method == "sft":
            return SFTTrainer(policy, EpochDraws(self.reference_records(self.train)), config, output_dir)
        if method != "story-lm":
            return super().trainer(method, policy, config, ppo, output_dir)
        if self.options.story_lm is not None:
            raise ConfigError("--method story-lm trains the story LM: drop story_lm")
        records, space = self.story_records(self.story_lm_stories + self.train)
        return SFTTrainer(policy.with_space(space), EpochDraws(records), config, output_dir)

    # ----------------------------------------------------------------- evaluation
    def eval_label(self, method: str, adapter: str | None) -> str:
        names = {"gfn": "GFlowNet fine-tuning", "sft": "supervised fine-tuning", "grpo": "GRPO (TRL)",
                 "story-lm": "story LM (prompting)", "prompting": "prompting", "left-to-right": "left-to-right"}
        return names[method] if adapter or method in self.eval_methods else "base model (prompting)"

    def evaluate(self, policy: Policy, output_dir: Path | None = None, label: str = "model") -> dict:
        o = self.options
        stories = self.test[: o.eval_stories]
        generator = torch.Generator().manual_seed(o.eval_seed)
        infills: list[list[str]] = []
        for start in tqdm(range(0, len(stories), o.eval_batch_stories), desc=f"infilling ({label})", unit="batch",
                          leave=False):
            chunk = stories[start : start + o.eval_batch_stories]
            queries = [self.query(s) for s in chunk for _ in range(o.eval_samples)]
            texts = policy.sample(queries, o.eval_temperature, generator).generated_texts(self.tokenizer)
            infills += [[t.strip() + SENTENCE_END for t in texts[i : i + o.eval_samples]]
                        for i in range(0, len(texts), o.eval_samples)]
        flat = [(story, z) for story, zs in zip(stories, infills) for z in zs]
        scorer = self.bertscore()
        scores = {
            "bertscore": scorer.f1([z for _, z in flat], [s.middle for s, _ in flat]),
            "bleu4": [bleu4(z, s.middle) for s, z in flat],
            "gleu4": [gleu4(z, s.middle) for s, z in flat],
            "sacrebleu": [sacrebleu4(z, s.middle) for s, z in flat],
            "log_p_ending": self.ending_log_likelihoods(policy, stories, infills),
        }
        k = o.eval_samples
        result = {"label": label}
        for name, values in scores.items():  # per draw: the mean over stories of the draw's infills
            draws = [statistics.mean(values[i::k]) for i in range(k)]
            result[name] = statistics.mean(values)
            result[f"{name}_std"] = statistics.stdev(draws) if k > 1 else 0.0
        result |= {
            "distinct": statistics.mean(len(set(zs)) for zs in infills),
            "mean_words": statistics.mean(len(z.split()) for _, z in flat),
            "story_log_likelihood": self.story_log_likelihood(policy, stories),
            "n_stories": len(stories), "eval_samples": k, "eval_temperature": o.eval_temperature,
            "infill_prompt": o.infill_prompt, "story_lm": o.story_lm,
            "bertscore_model": scorer.backbone, "bertscore_layer": scorer.layer,
            "bertscore_baseline": scorer.baseline if scorer.baseline is not None else "bert-score's own",
            "test_file": o.test_file or f"{o.stories_file} (rows 0-{o.validation_stories - 1})",
        }
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            lines = [json.dumps({"beginning": s.beginning, "ending": s.ending, "reference": s.middle, "infills": zs}) + "\n"
                     for s, zs in zip(stories, infills)]
            (output_dir / "samples.jsonl").write_text("".join(lines))
        return result

    def bertscore(self) -> BertScore:
        """The BERTScore of the options; the baseline pairs come from unrelated stories of the story-LM split."""
        o = self.options
        from bert_score.utils import model2layers

        from gfnlm.encoders import MPNET

        layer = o.bertscore_layer if o.bertscore_layer is not None else (8 if o.bertscore_model == MPNET else None)
        if o.bertscore_model in model2layers:
            return BertScore(o.bertscore_model, layer)
        pool = self.story_lm_stories or self.train
        rng = random.Random(0)
        pairs = []
        for _ in range(o.bertscore_baseline_pairs):
            a, b = rng.sample(range(len(pool)), 2)
            pairs.append((rng.choice(pool[a].sentences), rng.choice(pool[b].sentences)))
        return BertScore(o.bertscore_model, layer, pairs)

    @torch.no_grad()
    def ending_log_likelihoods(self, policy: Policy, stories: list[Story], infills: list[list[str]]) -> list[float]:
        """log p(Y | X Z) of each infill under the story LM (the base model): does Z lead to the end?"""
        out, model = [], policy.model
        with adapter_disabled(model), eval_mode(model):
            for story, zs in zip(stories, infills):
                records = text_records(self.tokenizer, [(Query(story.beginning), " " + z) for z in zs])
                traj = Trajectories.from_records(records, self.tokenizer.pad_token_id, policy.device)
                ending = self.tokenizer(" " + story.ending, add_special_tokens=False)["input_ids"]
                out += lm_continuation_log_likelihoods(model, traj, [ending])[:, 0].tolist()
        return out

    def story_records(self, stories: list[Story]) -> tuple[list[TrajectoryRecord], ActionSpace]:
        """Whole stories as the story LM learns them: sentences 2-5 after sentence 1, ended by EOS (the stop)."""
        records = text_records(self.tokenizer, [(Query(s.sentences[0]), " " + " ".join(s.sentences[1:])) for s in stories])
        return records, ActionSpace(stop_token_ids(self.tokenizer), max_len=max(r.length for r in records) + 1)

    @torch.no_grad()
    def story_log_likelihood(self, policy: Policy, stories: list[Story]) -> float:
        """Mean log p(sentences 2-5, EOS | sentence 1) per story under ``policy``'s model as evaluated (the story
        LM's objective)."""
        records, space = self.story_records(stories)
        values, story_policy = [], policy.with_space(space)
        with eval_mode(policy.model):
            for start in range(0, len(records), 32):
                traj = Trajectories.from_records(records[start : start + 32], self.tokenizer.pad_token_id, policy.device)
                values += terminal_values(policy_prefix_log_likelihoods(story_policy, traj), traj).tolist()
        return statistics.mean(values)
