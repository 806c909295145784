"""Pure maths, no state: KL estimators and penalty declarations, statistics, Gao et al.'s over-optimization forms, the hypervolume.

The bottom layer: it imports nothing else of rlhf_sweep (and torch only where a function takes tensors).
"""
