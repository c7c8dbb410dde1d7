"""Preference learning stage: reward model (``llm-ray reward``) and DPO (``llm-ray dpo``) on the engine."""
