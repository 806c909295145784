"""Policy optimisation: one module per algorithm (PPO, RLOO, GRPO, DPO/IPO, best-of-n) and the code they share; their cards are in config/algorithms.py."""
