"""What a model does, from its weights and from its tokens; nothing here trains.

- `directions.py`: the singular defect directions from the weights alone (the linearization of every block);
- `detection.py`: the one module that decides which tokens are defects and which are high-norm, and which direction
  each layer is tested along (the weights' or the data's); `find_defect_tokens` and the training step's
  `detect_layer_defects` both call it;
- `direction_files.py`: the chosen directions on disk (checkpoints, the evaluation cache);
- `preservation.py`: how far a repair moved the output features (clean-token and CLS cosines).
"""
