"""Preflight: the operator's tools before a run. plan.py: what a config costs (parameters, FLOPs, memory per rank,
steps per epoch) on no GPU; doctor.py: what a machine, or every rank of a job, can run (GPUs, Horovod, DALI, MLflow,
data). May import distributed, data, model and the ground floor.
"""
