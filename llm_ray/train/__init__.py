"""The training engine on Ray Train with DeepSpeed, shared by every stage that trains.

    objective.py    the objective seam (pretraining's causal and masked LM live here)
    loop.py         the one worker loop: engine, objective's loss, checkpoints, exact resume
    parallelize.py  model spec -> DeepSpeed engine (activation checkpointing, pipeline, ZeRO)
    launcher.py     driver side: pretrain, TrainJob, build_trainer / run_trainer / fit
    tuning.py       what sft, reward and dpo share when they tune a model folder
"""
