"""Whether the subjectivity target separates the labels: the base model's reward of fixed rationales.

For each training review X and each candidate rationale Z, prints log R = log p(Z, ", so it is Y." | X)
for the true label Y, and how much more likely the true label makes it than the other one
(log R(Y) - log R(not Y)). If one Z has the highest log R for both labels, the target posterior
p(Z | X, Y) puts most of its mass on it whatever Y is, and a policy that matches it predicts little.
    python3 scripts/subjectivity_reward_probe.py [--model smollm2-135m] [--train-size 10]
"""

from __future__ import annotations

import argparse

import torch

from gfnlm.config import TrainConfig
from gfnlm.models import load_model_and_tokenizer
from gfnlm.rewards import terminal_values
from gfnlm.sampling import text_records
from gfnlm.tasks.subjectivity import LABELS, SubjectivityOptions, SubjectivityTask
from gfnlm.trajectories import Query, Trajectories

CANDIDATES = ["opinion", "subject", "personal", "a fact", "a plot summary", "factual", "emotional", "about a film"]


def terminal_log_rewards(task: SubjectivityTask, reward, query: Query, rationales: list[str]) -> torch.Tensor:
    """log R of each rationale (written after a space, as the policy writes it) for ``query``: [len(rationales)]."""
    records = text_records(task.tokenizer, [(query, " " + z) for z in rationales])
    traj = Trajectories.from_records(records, task.tokenizer.pad_token_id or 0, torch.device("cpu"))
    with torch.no_grad():
        return terminal_values(reward(traj), traj)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--train-size", type=int, default=10)
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model, device="cpu")
    task = SubjectivityTask(SubjectivityOptions(train_size=args.train_size), tokenizer)
    reward = task.reward(task.policy(model, TrainConfig(device="cpu")))
    print("label        " + "  ".join(f"{z:>16}" for z in CANDIDATES) + "   (log R, true - other label)")
    for review in task.train:
        query = task.query(review)
        other = next(label for label in LABELS if label != review.label_text)
        flipped = Query(query.prompt, target=f", so it is {other}.", meta=query.meta)
        true = terminal_log_rewards(task, reward, query, CANDIDATES)
        false = terminal_log_rewards(task, reward, flipped, CANDIDATES)
        cells = [f"{t:6.1f} / {t - f:+5.1f}" for t, f in zip(true.tolist(), false.tolist())]
        print(f"{review.label_text:<12} " + "  ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
