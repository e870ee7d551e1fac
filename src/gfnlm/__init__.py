"""gfnlm: GFlowNet fine-tuning of causal language models."""
