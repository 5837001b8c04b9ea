"""The DRM: model and persistence (model.py), the per-worker Ray Train loop (train_loop.py), the training driver
(trainer.py) and held-out evaluation (evaluate.py)."""
