"""The trainer: the shared training loop, the InstructGPT stages (pretrain, SFT, reward model, PPO / PPO-ptx), the
whole-recipe pipeline, checkpoints, metrics and evaluation."""
