"""Inference: a trained model from a checkpoint, a run directory or a `models:/` URI (loading.py), sampling and
decoding in eager, compiled or CUDA-graphed mode with the sample grids (decoding.py), and what users do with latents:
encode, decode, interpolate, manipulate along attributes (latents.py). May import model, data and the ground floor;
never training, tracking or distributed.
"""
