"""Policy optimisation: one module per algorithm (PPO, RLOO, GRPO, DPO/IPO, best-of-n), the code they share, the registry."""
