"""Integer arithmetic with a calculator tool (paper §4.4, Table 4, Table E.3).

X is a question "Question: 6 - 0 - 4 - 8 = ? Answer:", the latent Z a chain of two-term tool
calls " 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6" (the calculator writes each value after "="), and Y
". The answer is -6.". The policy q(Z | X) writes only digits, "+", "-", "=", ",", spaces, and
stops by writing "." (the first token of Y). The reward is p_LM(X Z Y | k demonstrations): the
demonstrations sit in the reward's context only, cached once (``gfnlm.context``). The setting
``reward_likelihood_weight`` v raises its p_LM(Y | X Z) factor to the power v.

Evaluation, for every method alike: draw ``eval_samples`` rationales per test question at
``eval_temperature`` with the calculator on; the base LM then completes the answer greedily
after "X Z." with the reward's demonstrations in context (p_LM(Y | X Z), as in the paper); the
first integer of each completion is that sample's answer and the majority vote is the prediction.
k-shot prompting puts ``shots`` shuffled worked examples in a cached context before each question
(like the reward's demonstrations; a tokenizer that adds a BOS token puts one before each).

Data files are JSON lists (or JSON lines) in the paper's release format: ``str_query``,
``num_sol`` (an integer) and optionally ``str_sol`` and ``str_rationale``.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gfnlm.config import setting
from gfnlm.context import SharedContext, prompting_context
from gfnlm.data import read_rows, row_name
from gfnlm.exact import token_strings
from gfnlm.modes import adapter_disabled
from gfnlm.models import stop_token_ids
from gfnlm.rewards import LMSuffixReward
from gfnlm.policy import Policy
from gfnlm.sampling import encode_prompts, take_action
from gfnlm.tasks.base import Task, TaskOptions, likelihood_weight_setting
from gfnlm.tools import CalculatorTool, fill_in_results, last_tool_result
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord

logger = logging.getLogger("gfnlm")

DATA_DIR = "../shared/data/arithmetic"
RATIONALE_TOKEN = re.compile(r" ?[0-9+\-=,]| ")
"""Text of a token the rationale may use: one digit, operator, "=" or ",", optionally after a space."""
RATIONALE_UNIT = re.compile(r" ?[^ ]")
"""A worked rationale's characters, each with the space before it, are tokenized one by one: a tokenizer
may merge " =," into one token (Gemma's does), which would leave the calculator no place to insert."""
_INTEGER = re.compile(r"-?\d+")
ZERO_SHOT_CUE = "Let us think step by step."
DEFAULT_TRAIN_EVAL_QUESTIONS = 100


@dataclass(frozen=True)
class Problem:
    """One arithmetic question with its answer (and, for worked examples, the rationale)."""

    question: str  # X, e.g. "Question: 6 - 0 - 4 - 8 = ? Answer:"
    answer: int
    solution: str  # Y, e.g. ". The answer is -6."
    rationale: str | None = None  # Z without tool results, e.g. "6 - 0 =, 6 - 4 =, 2 - 8 ="

    def demonstration(self) -> str:
        """The example as text with the calculator's results filled in, for k-shot contexts."""
        if self.rationale is None:
            raise ValueError(f"{self.question!r} has no worked rationale to demonstrate")
        return f"{self.question} {fill_in_results(self.rationale)}{self.solution}\n"


def load_problems(source: str | Path) -> list[Problem]:
    """Problems from a JSON / JSON-lines file, or a Hugging Face dataset name (needs ``datasets``).

    Each row needs ``str_query`` (text) and ``num_sol`` (an integer); a bad row is named.
    """
    return [_problem_from_row(row, source, i) for i, row in enumerate(read_rows(source))]


def _problem_from_row(row: dict, source: str | Path, index: int) -> Problem:
    where = row_name(source, index)
    missing = [k for k in ("str_query", "num_sol") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    answer = row["num_sol"]
    if isinstance(answer, bool) or not isinstance(answer, int):
        if not (isinstance(answer, str) and _INTEGER.fullmatch(answer.strip())):
            raise ValueError(f"{where}: num_sol must be an integer, got {answer!r}")
        answer = int(answer)
    question = row["str_query"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: str_query must be non-empty text")
    rationale = row.get("str_rationale")
    return Problem(question, answer, row.get("str_sol") or f". The answer is {answer}.", rationale)


def generate_problems(operands: int, n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``n`` distinct new questions with ``operands`` one-digit operands (+ and -), in the release format,
    none of whose ``str_query`` is in ``exclude``; with the left-to-right two-term rationale."""
    if operands < 2:
        raise ValueError("a question needs at least 2 operands")
    if n > 4 * 10**operands:  # loose upper bound on distinct questions
        raise ValueError(f"cannot draw {n} distinct questions with {operands} operands")
    rng = random.Random(seed)
    rows, seen = [], set(exclude)
    for _ in range(100 * n + 1000):
        if len(rows) == n:
            break
        numbers = [rng.randrange(10) for _ in range(operands)]
        ops = [rng.choice("+-") for _ in range(operands - 1)]
        expression = " ".join([str(numbers[0])] + [f"{o} {d}" for o, d in zip(ops, numbers[1:])])
        query = f"Question: {expression} = ? Answer:"
        if query in seen:
            continue
        seen.add(query)
        value, steps = numbers[0], []
        for o, d in zip(ops, numbers[1:]):
            steps.append(f"{value} {o} {d} =")
            value = value + d if o == "+" else value - d
        rows.append({"str_query": query, "num_sol": value, "str_rationale": ", ".join(steps),
                     "str_sol": f". The answer is {value}."})
    if len(rows) < n:
        raise ValueError(f"found only {len(rows)} new questions with {operands} operands outside the excluded ones")
    return rows


@dataclass
class ArithmeticOptions(TaskOptions):
    train_file: str = setting(f"{DATA_DIR}/1digit_34_op+-_hw.json", "Questions with answers (X, Y) to train on.")
    worked_file: str = setting(
        f"{DATA_DIR}/1digit_34_op+-_train_50.json",
        "Worked examples (X, Z, Y): reward demonstrations, buffer seeds, SFT data; also trained on.")
    seed_rationales: int = setting(50, "Worked rationales put in the replay buffer before training (Table E.3).")
    reward_shots: int = setting(3, "Worked examples prepended to the reward's context (paper: 3).")
    reward_likelihood_weight: float = likelihood_weight_setting(
        "v > 1 weighs down the short wrong chains a small LM's prior favours.")
    max_len: int = setting(24, "Most rationale tokens (actions) during training.")
    min_len: int = setting(5, "Fewest rationale tokens before the policy may stop (paper: 5).")
    test_file: str | None = setting(None, "Questions to evaluate on (default: the first training questions).")
    eval_questions: int | None = setting(
        None, "Evaluate on at most this many questions (default: all of test_file, or 100 training questions).")
    eval_samples: int = setting(10, "Rationales drawn per question for the majority vote.")
    eval_temperature: float = setting(0.1, "Sampling temperature of the rationales in evaluation.")
    eval_max_len: int = setting(40, "Most rationale tokens in evaluation (5-operand chains need more than 24).")
    eval_batch_questions: int = setting(16, "Questions per evaluation batch.")
    eval_batch_tokens: int = setting(
        2**17, "Most tokens in one evaluation batch's KV cache (rows x (shots + prompt + rationale)): with long "
        "k-shot contexts a batch takes fewer questions (20 shots: ~9000 tokens per question of 10 rationales).")
    answer_max_tokens: int = setting(8, "Tokens the base LM may write when completing the answer Y.")
    shots: int = setting(0, "k-shot prompting: worked examples in context before each question (evaluation baseline).")
    shot_seed: int = setting(0, "Seed of the shuffle that picks the k-shot examples.")
    cue: str = setting("", "Text appended to the question in the policy's prompt, e.g. 'Let us think step by step.'")
    eval_seed: int = setting(0, "Seed of the evaluation samples (training uses `seed`).")


@dataclass
class ArithmeticDataOptions:
    """``gfnlm data arithmetic``: new questions in the release format, none from given files."""

    operands: int = setting(4, "Operands per question.")
    n: int = setting(100, "Number of questions.")
    seed: int = setting(0, "Seed of the draw.")
    exclude: list[str] | None = setting(
        None, "Files whose questions must not appear, as a list '[a.json, b.json]' (default: the training files).")


class ArithmeticTask(Task):
    name = "arithmetic"
    Options = ArithmeticOptions
    options: ArithmeticOptions
    summary_keys = ("accuracy", "n_questions", "unparsable_answers")
    train_methods = ("gfn", "sft", "ppo")  # no grpo: TRL cannot insert the calculator's tokens mid-generation
    eval_methods = ("prompting",)
    DataOptions = ArithmeticDataOptions

    @classmethod
    def make_data(cls, options: ArithmeticDataOptions) -> list[dict]:
        excluded = options.exclude if options.exclude is not None else [ArithmeticOptions.train_file,
                                                                         ArithmeticOptions.worked_file]
        seen = {p.question for path in excluded for p in load_problems(path)}
        logger.info("%d new questions with %d operands, none of the %d in %s", options.n, options.operands,
                    len(seen), ", ".join(map(str, excluded)))
        return generate_problems(options.operands, options.n, options.seed, seen)

    def __init__(self, options: ArithmeticOptions, tokenizer):
        super().__init__(options, tokenizer)
        o = options
        if o.reward_shots < 0 or o.shots < 0 or o.seed_rationales < 0:
            raise ValueError("reward_shots, shots and seed_rationales must be non-negative")
        if o.eval_samples < 1 or o.eval_batch_questions < 1 or o.eval_batch_tokens < 1:
            raise ValueError("eval_samples, eval_batch_questions and eval_batch_tokens must be positive")
        self.worked = load_problems(o.worked_file)
        if any(p.rationale is None for p in self.worked):
            raise ValueError(f"{o.worked_file}: every worked example needs str_rationale")
        for count, name in ((o.reward_shots, "reward_shots"), (o.shots, "shots"), (o.seed_rationales, "seed_rationales")):
            if count > len(self.worked):
                raise ValueError(f"{name}={count} but {o.worked_file} has {len(self.worked)} worked examples")
        # a bad test file fails here, before any work; it is read once
        self._test_set = load_problems(o.test_file) if o.test_file is not None else None
        self.stop_ids = self._stop_ids()
        self.allowed_ids = tuple(t for t, s in token_strings(tokenizer).items() if RATIONALE_TOKEN.fullmatch(s))
        self._reward_context: SharedContext | None = None
        self._worked_records: list[TrajectoryRecord] | None = None

    def _stop_ids(self) -> tuple[int, ...]:
        ids = tuple(t for t, s in token_strings(self.tokenizer).items() if s == ".")
        if not ids:
            raise ValueError("the tokenizer has no '.' token, which ends the rationale in this task")
        return ids

    @classmethod
    def method_settings(cls, method: str, settings: dict) -> dict:
        """Zero-shot prompting appends the chain-of-thought cue (paper §4.4). GFlowNet runs anneal the
        reward temperature as in Table E.2 (1.1 -> 0.5 over 150 steps; its behaviour-policy
        temperatures 0.5-2 and buffer capacity 50 are the library's defaults) and start log Z at its
        first estimate (log p(X Z Y | demonstrations) is -20 to -60, far from 0)."""
        if method == "prompting" and int(settings.get("shots", 0)) == 0:
            return {"cue": ZERO_SHOT_CUE}
        if method == "gfn":
            return {"reward_temp_start": 1.1, "reward_temp_end": 0.5, "reward_temp_horizon": 150,
                    "log_z_init": "estimate"}
        return {}

    # ----------------------------------------------------------------- the engine's inputs
    def query(self, problem: Problem) -> Query:
        return Query(problem.question, target=problem.solution, meta={"answer": problem.answer})

    def train_queries(self) -> list[Query]:
        problems = self.worked + load_problems(self.options.train_file)
        return list({q.key: q for q in map(self.query, problems)}.values())

    def action_space(self, max_len: int | None = None) -> ActionSpace:
        o = self.options
        return ActionSpace(self.stop_ids, max_len or o.max_len, min(o.min_len, max_len or o.max_len), self.allowed_ids)

    def reward_context(self, model) -> SharedContext | None:
        """The k demonstrations before every reward (and answer) context, computed once per model."""
        if self.options.reward_shots == 0:
            return None
        if self._reward_context is None:
            text = "".join(p.demonstration() for p in self.worked[: self.options.reward_shots])
            self._reward_context = SharedContext(model, self.tokenizer, text)
        return self._reward_context

    def reward(self, policy: Policy) -> LMSuffixReward:
        return LMSuffixReward(policy, likelihood_weight=self.options.reward_likelihood_weight,
                              context=self.reward_context(policy.model))

    def tool(self) -> CalculatorTool:
        return CalculatorTool(self.tokenizer)

    def rationale_record(self, problem: Problem) -> TrajectoryRecord:
        """A worked rationale as the policy would write it: its actions, with the calculator inserting after "="."""
        query = self.query(problem)
        actions = [token for unit in RATIONALE_UNIT.findall(" " + problem.rationale)
                   for token in self.tokenizer(unit, add_special_tokens=False)["input_ids"]]
        allowed = set(self.allowed_ids)
        bad = [self.tokenizer.decode([t]) for t in actions if t not in allowed]
        if bad:
            raise ValueError(f"worked rationale {problem.rationale!r} uses tokens outside the action space: {bad}")
        tool, generated, is_action = self.tool(), [], []
        for token in actions:
            take_action(query, generated, is_action, token, tool)
        return TrajectoryRecord(query, encode_prompts(self.tokenizer, [query])[0], generated, is_action)

    def seed_records(self, policy: Policy, generator: torch.Generator) -> list[TrajectoryRecord]:
        return [self.rationale_record(p) for p in self.worked[: self.options.seed_rationales]]

    def sft_examples(self, n: int, generator: torch.Generator) -> list[TrajectoryRecord]:
        """Worked rationales drawn uniformly (SFT on the tool-use sequences, paper §4.4)."""
        if self._worked_records is None:  # built once: SFT draws from them every step
            self._worked_records = [self.rationale_record(p) for p in self.worked]
        picks = torch.randint(len(self._worked_records), (n,), generator=generator).tolist()
        return [self._worked_records[i] for i in picks]

    # ----------------------------------------------------------------- evaluation
    def policy_prompt(self, problem: Problem) -> str:
        """The policy's prompt: the question and the cue (k-shot examples go in ``shots_context``)."""
        return problem.question + (f" {self.options.cue}" if self.options.cue else "")

    def shots_context(self, model) -> SharedContext | None:
        """k shuffled worked examples before every prompt (k-shot prompting), run through the model once."""
        return prompting_context(model, self.tokenizer, self.worked, self.options.shots, self.options.shot_seed)

    def questions_per_batch(self, problems: list[Problem], context: SharedContext | None) -> int:
        """``eval_batch_questions``, or fewer where the batch's KV cache would pass ``eval_batch_tokens``.

        Every row (one rationale) keeps its own copy of the context's keys and values once it grows, so
        memory scales with rows x (context + prompt + rationale). Unbounded, 20-shot prompting of 100
        questions x 10 rationales held 64 GB of GPU memory for SmolLM2-135M."""
        o = self.options
        prompt = max((len(self.tokenizer(self.policy_prompt(p))["input_ids"]) for p in problems), default=0)
        row_tokens = (len(context) if context is not None else 0) + prompt + o.eval_max_len
        return max(1, min(o.eval_batch_questions, o.eval_batch_tokens // (o.eval_samples * row_tokens)))

    def test_problems(self) -> tuple[str, list[Problem]]:
        """Where the evaluation questions come from, and the first ``eval_questions`` of them."""
        o = self.options
        if o.test_file is not None:
            return o.test_file, self._test_set[: o.eval_questions]
        logger.warning("no test_file given: evaluating on training questions from %s", o.train_file)
        limit = o.eval_questions if o.eval_questions is not None else DEFAULT_TRAIN_EVAL_QUESTIONS
        return o.train_file, load_problems(o.train_file)[:limit]

    def complete_answers(self, policy: Policy, prompts: list[str]) -> list[int | None]:
        """The base LM's answer after each "X Z." (greedy, reward demonstrations in context)."""
        eos = stop_token_ids(self.tokenizer)
        answering = policy.with_space(ActionSpace(self.stop_ids + eos, self.options.answer_max_tokens))
        unique = list(dict.fromkeys(prompts))
        answers: dict[str, int | None] = {}
        batch = self.options.eval_batch_questions * self.options.eval_samples
        with adapter_disabled(policy.model):
            context = self.reward_context(policy.model)
            for start in range(0, len(unique), batch):
                chunk = unique[start : start + batch]
                traj = answering.sample([Query(p) for p in chunk], temperature=0.0, context=context)
                for prompt, text in zip(chunk, traj.generated_texts(self.tokenizer)):
                    found = _INTEGER.search(text)
                    answers[prompt] = int(found.group()) if found else None
        return [answers[p] for p in prompts]

    def evaluate(self, policy: Policy, output_dir: Path | None = None, label: str = "model") -> dict:
        o = self.options
        source, problems = self.test_problems()
        rationales_policy = policy.with_space(self.action_space(o.eval_max_len), self.tool())
        generator = torch.Generator().manual_seed(o.eval_seed)
        predictions = []
        context = self.shots_context(policy.model)
        step = self.questions_per_batch(problems, context)
        for start in tqdm(range(0, len(problems), step), desc=f"evaluating {label}", unit="batch", leave=False):
            chunk = problems[start : start + step]
            queries = [Query(self.policy_prompt(p)) for p in chunk for _ in range(o.eval_samples)]
            traj = rationales_policy.sample(queries, o.eval_temperature, generator, context=context)
            rationales = traj.generated_texts(self.tokenizer)
            answer_prompts = [f"{chunk[i // o.eval_samples].question}{z}." for i, z in enumerate(rationales)]
            answers = self.complete_answers(policy, answer_prompts)
            for j, problem in enumerate(chunk):
                rows = slice(j * o.eval_samples, (j + 1) * o.eval_samples)
                predictions.append(_vote(problem, rationales[rows], answers[rows]))
        correct = sum(p["correct"] for p in predictions)
        n = len(predictions)
        result = {
            "label": label,
            "accuracy": correct / n if n else None,
            "n_questions": n,
            "n_correct": correct,
            "unparsable_answers": sum(p["unparsable"] for p in predictions),
            "questions_without_answer": sum(p["prediction"] is None for p in predictions),
            "calculator_calls": calls_histogram([z for p in predictions for z in p["rationales"]]),
            # the vote over each rationale's last calculator result: the chain's own answer, before
            # the LM completes Y (the gap to ``accuracy`` is what the answer completion loses or adds)
            "chain_accuracy": sum(p["chain_correct"] for p in predictions) / n if n else None,
            "test_file": str(source),
            "shots": o.shots,
            "eval_samples": o.eval_samples,
            "eval_temperature": o.eval_temperature,
        }
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
        return result


def calls_histogram(rationales: list[str]) -> dict[int, int]:
    """How many rationales call the calculator (write "=") 0, 1, 2, ... times.

    A chain over k operands needs k - 1 calls; a policy that stops after the first call, or never
    calls, shows here at a glance.
    """
    return dict(sorted(Counter(z.count("=") for z in rationales).items()))


def _majority(values: list[int | None]) -> int | None:
    votes = Counter(v for v in values if v is not None)
    return votes.most_common(1)[0][0] if votes else None


def _vote(problem: Problem, rationales: list[str], answers: list[int | None]) -> dict:
    """Majority vote over one question's sampled answers; no parsable answer counts as wrong."""
    prediction = _majority(answers)
    return {
        "question": problem.question,
        "answer": problem.answer,
        "prediction": prediction,
        "correct": prediction == problem.answer,
        "chain_correct": _majority([last_tool_result(z) for z in rationales]) == problem.answer,
        "unparsable": sum(a is None for a in answers),
        "rationales": rationales,
        "answers": answers,
    }
