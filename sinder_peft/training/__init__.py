"""The repair's training, driven by Accelerate.

- `arguments.py`: `TrainingArguments`, the hyperparameters and the recipes' defaults;
- `loss.py`: the smooth neighbourhood loss and the clean-token preservation term (pure functions);
- `window_loss.py`: one batch's loss: the defect search (`analysis.detection` at each layer) and each image's loss
  over its gradient window;
- `trainer.py`: `SinderTrainer`, the loop that orchestrates the steps; `progress.py`: its progress bar and tracker
  logging;
- `state.py`, `checkpoints.py`, `interruption.py`, `distributed.py`: what a run has done and when it stops,
  checkpoints and resume, Ctrl-C / SIGTERM, and the collectives that keep processes in step.
"""
