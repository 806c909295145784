"""Models built from config (no downloads): the causal LMs and their sampling, SFT, the reward model and its training."""
