"""Alignment stages on the engine: reward model (``llm-ray reward``), DPO (``llm-ray dpo``), and RL
from a reward (``llm-ray ppo``: PPO and GRPO on Ray actor pools, ``ppo.py`` driving ``pools.py``)."""
