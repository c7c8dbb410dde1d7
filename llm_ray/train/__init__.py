"""Pretraining on Ray Train with DeepSpeed: recipe -> engine -> checkpoints -> summary."""
