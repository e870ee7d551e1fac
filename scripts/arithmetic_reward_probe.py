"""Whether the arithmetic target favours right chains: the reward of each worked rationale against wrong ones.

For every worked question that is not one of the reward's own demonstrations, it scores the worked
rationale Z and three wrong ones that a small LM's prior tends to prefer:
    one call    one call over the whole expression ("3 - 7 - 9 ="; the calculator evaluates only "7 - 9")
    first call  the first call alone ("3 - 7 =")
    short       the worked chain without its last call (questions with 4 or more operands)
and prints, for each wrong kind, in how many questions it scores above the right chain under
    R        log p(X Z Y) with the demonstrations in context, the training target (v = 1)
    p(Y|XZ)  the likelihood alone: does the answer tell the chains apart?
    R, v     the reward with the likelihood weighted by --likelihood-weight (R = p(Z | X) p(Y | X Z)^v)
A GFlowNet that samples R exactly writes the wrong kind wherever it wins.
    python3 scripts/arithmetic_reward_probe.py [--model smollm2-135m] [--likelihood-weight 3]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from gfnlm.config import TrainConfig
from gfnlm.models import load_model_and_tokenizer
from gfnlm.rewards import lm_prefix_log_likelihoods, terminal_values
from gfnlm.tasks.arithmetic import ArithmeticOptions, ArithmeticTask, Problem
from gfnlm.trajectories import Trajectories

WRONG_KINDS = ("one call", "first call", "short")


def candidate_rationales(problem: Problem) -> dict[str, str]:
    """The worked rationale ("right") and the wrong kinds that differ from it, as calculator calls."""
    calls = problem.rationale.split(", ")
    expression = problem.question.removeprefix("Question: ").split(" = ?")[0]
    candidates = {"right": problem.rationale, "one call": f"{expression} =", "first call": calls[0]}
    if len(calls) > 2:
        candidates["short"] = ", ".join(calls[:-1])
    return candidates


def terminal_scores(task: ArithmeticTask, model, problems: list[Problem], rationales: list[str],
                    batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """log R and log p(X Z) (demonstrations in context) at each rationale's end: two [len(rationales)] tensors."""
    reward, context = task.reward(task.policy(model, TrainConfig(device="cpu"))), task.reward_context(model)
    log_r, prior = [], []
    for start in range(0, len(rationales), batch_size):
        records = [task.rationale_record(replace(p, rationale=z))
                   for p, z in zip(problems[start:start + batch_size], rationales[start:start + batch_size])]
        traj = Trajectories.from_records(records, task.tokenizer.pad_token_id)
        with torch.no_grad():
            log_r.append(terminal_values(reward(traj), traj))
            prior.append(terminal_values(lm_prefix_log_likelihoods(model, traj, context=context), traj))
    return torch.cat(log_r), torch.cat(prior)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--likelihood-weight", type=float, default=3.0)
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model, device="cpu")
    task = ArithmeticTask(ArithmeticOptions(), tokenizer)
    problems = task.worked[task.options.reward_shots:]  # the demonstrations would score themselves
    rows = [(i, kind, z) for i, p in enumerate(problems) for kind, z in candidate_rationales(p).items()]
    log_r, prior = terminal_scores(task, model, [problems[i] for i, _, _ in rows], [z for _, _, z in rows])
    likelihood = log_r - prior  # log p(Y | X Z), the stop included
    weighted = prior + args.likelihood_weight * likelihood
    scores = {(i, kind): (r, lik, w) for (i, kind, _), r, lik, w in
              zip(rows, log_r.tolist(), likelihood.tolist(), weighted.tolist(), strict=True)}
    print(f"{args.model}: {len(problems)} worked questions; in how many a wrong kind scores above the right chain")
    print(f"{'wrong kind':<12} {'questions':>9} {'R':>5} {'p(Y|XZ)':>8} {f'R, v={args.likelihood_weight:g}':>9}"
          f"   mean log R, right / wrong")
    for kind in WRONG_KINDS:
        pairs = [(scores[i, "right"], scores[i, kind]) for i in range(len(problems)) if (i, kind) in scores]
        wins = [sum(wrong[i] > right[i] for right, wrong in pairs) for i in range(3)]
        right_mean = sum(right[0] for right, _ in pairs) / len(pairs)
        wrong_mean = sum(wrong[0] for _, wrong in pairs) / len(pairs)
        print(f"{kind:<12} {len(pairs):>9} {wins[0]:>5} {wins[1]:>8} {wins[2]:>9}   {right_mean:.1f} / {wrong_mean:.1f}")


if __name__ == "__main__":
    main()
