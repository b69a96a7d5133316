"""Pictures of a model's tokens: norm maps, PCA maps, per-layer norm plots, before/after and evaluation figures
(`figures.py`). Pure drawing: it imports nothing else of sinder-peft."""
