"""Training: the Trainer (trainer.py) as a composition of components built from config: the state a checkpoint
holds and the checkpoint manager with its background writer (state.py, checkpoints.py, background.py), optimizer
and learning-rate schedule (optimizer.py), the step in its three modes (step.py), EMA (ema.py), evaluation and the
sample-weight policy (evaluation.py), the loop with its periodic actions (loop.py), elastic training around the same
loop (elastic.py), stop signals (stop.py). May import tracking, inference, distributed, data, model and the ground
floor; nothing imports it but the commands.
"""
