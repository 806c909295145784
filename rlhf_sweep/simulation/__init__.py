"""The simulated world: vocabulary, prompts, demonstrations, the gold score and the biased labelers."""
