"""Fine-tuning stage: ``llm-ray sft`` (chat or classification; freezing, LoRA) on the engine."""
