"""llm-ray: pretrain, fine-tune, align, compress and serve transformer LMs on Ray."""

__version__ = "0.1.0"
