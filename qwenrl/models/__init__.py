"""Models: the Qwen prompt encoder, the refiner, the RL policy and the agent."""
