"""Privacy and security stages: federated training with secure aggregation, canary exposure,
the red-team suite. DP-SGD itself is an engine option (``train/dp.py``); encryption at rest is
``llm_ray/encryption.py``."""
