"""llm-ray: pretrain, fine-tune, align, compress and serve transformer LMs on Ray, privately if asked
(DP-SGD, federated training with secure aggregation, encryption at rest)."""

__version__ = "0.1.0"
