"""Tracking: the MLflow client of a run (client.py: a Tracker that survives an unreachable server, with a local
metrics.jsonl), what a run page says about a run (metadata.py: params, tags, name, description), the rank-0
boundary of training (reporter.py: progress, metrics, samples, checkpoint uploads, stop reasons), and the trained
model as an MLflow model (mlflow_model.py). May import inference, model, data and the ground floor; never training.
"""
