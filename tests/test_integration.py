"""A short real run on the embedded SmolLM2-135M: GFlowNet fine-tuning moves it toward the target."""

import math

import pytest

from gfnlm.config import TrainConfig
from gfnlm.models import load_model_and_tokenizer
from gfnlm.tasks.random_number import RandomNumberOptions, RandomNumberTask
from gfnlm.gflownet import GFlowNetTrainer

pytestmark = pytest.mark.integration


def test_gfn_fine_tuning_teaches_the_embedded_model_to_write_digits(tmp_path):
    model, tokenizer = load_model_and_tokenizer()
    # digits 0..9 (10 outcomes, 2 tokens at most) keep the run to about a minute on 2 cores
    task = RandomNumberTask(RandomNumberOptions(low=0, high=9, max_len=2), tokenizer)
    config = TrainConfig(steps=30, queries_per_step=1, samples_per_query=16, lr=3e-3, lr_decay="cosine", lora_rank=8,
                         lora_alpha=16, log_z_lr=0.02, pf_temp_max=1.2, progress=False, save_every=10,
                         buffer_sampling="deficit")
    policy = task.policy(model, config)  # the default precision: bfloat16 weights on a CPU that computes it
    before = task.evaluate(policy, n_samples=0)
    trainer = GFlowNetTrainer(policy, task.reward(policy), task.train_queries(), config, output_dir=tmp_path)
    trainer.train()
    after = task.evaluate(trainer.policy, n_samples=0)
    assert after["valid_mass"] > max(0.5, 100 * before["valid_mass"])
    # close to uniform over the ten digits. Deficit replay (the demo's setting) brings back the
    # digits the policy drops: measured 2026-11-29, KL 0.000 / 0.004 / 0.001 / 0.008 for seeds 0-3.
    # With uniform replay 30 steps left the spread to chance (seed 0 collapsed onto "1" and "2",
    # KL 1.63; seeds 1 and 2 reached 0.08 and 0.09).
    assert after["kl"] < 0.1
    assert (tmp_path / "checkpoints").is_dir()


def test_gfn_fine_tuning_makes_the_embedded_models_next_sentences_likelier(tmp_path):
    from gfnlm.tasks.continuation import ContinuationOptions, ContinuationTask

    model, tokenizer = load_model_and_tokenizer()
    prompts = tmp_path / "prompts.txt"  # two of the release's prompts, trained on and evaluated on
    prompts.write_text("She questions the suspension and the timing. \nThe federal cabinet approved the extension from July 1. \n")
    options = ContinuationOptions(prompts_file=str(prompts), prompts_used=2, train_prompts=2, test_file=str(prompts),
                                  max_len=12, eval_samples=16, encoder="all-MiniLM-L6-v2")
    task = ContinuationTask(options, tokenizer)
    config = TrainConfig(steps=12, queries_per_step=2, samples_per_query=8, lr=1e-3, lora_rank=8, lora_alpha=16,
                         reward_temp_end=0.5, p_replay=0.25, p_tempered=0.25, log_z_init="estimate", progress=False)
    policy = task.policy(model, config)
    before = task.evaluate(policy)
    trainer = GFlowNetTrainer(policy, task.reward(policy), task.train_queries(), config)
    trainer.train()
    after = task.evaluate(trainer.policy)
    # measured 2026-12-02 (one thread): mean log p(Z . | X) of the policy's sentences -53.1 before, -12.4 after
    assert after["mean_log_likelihood"] > before["mean_log_likelihood"] + 5


def test_the_story_lm_learns_stories_and_a_gflownet_trains_on_top(tmp_path):
    from gfnlm.config import TrainConfig as Config
    from gfnlm.tasks.infilling import InfillingOptions, InfillingTask

    model, tokenizer = load_model_and_tokenizer()
    task = InfillingTask(InfillingOptions(eval_stories=20), tokenizer)
    config = Config(steps=12, queries_per_step=8, samples_per_query=1, lr=1e-3, progress=False, save_every=12)
    policy = task.policy(model, config)
    before = task.story_log_likelihood(policy, task.validation[:20])
    story_lm = task.trainer("story-lm", policy, config, None, tmp_path / "story-lm")
    story_lm.train()
    after = task.story_log_likelihood(story_lm.policy, task.validation[:20])
    # measured 2026-12-02 (one thread): mean log p(sentences 2-5 | sentence 1) -139.0 before, -122.9 after
    assert after > before + 5
    base, _ = load_model_and_tokenizer()
    task = InfillingTask(InfillingOptions(story_lm=str(tmp_path / "story-lm")), tokenizer)
    config = Config(**{**task.method_settings("gfn", {}), "steps": 2, "queries_per_step": 2, "samples_per_query": 4,
                       "progress": False})
    gfn = task.trainer("gfn", task.policy(task.prepare_base_model(base), config), config, None, None)
    assert len(gfn.buffer) == len(task.reference_records(task.train))  # seeded with the true fourth sentences
    history = gfn.train()
    assert all(math.isfinite(row["loss"]) and row["log_reward_mean"] < 0 for row in history)
