"""Models in and out.

- `loading.py`: loading a backbone from whatever `--model` names (Hub ids, local directories, `demo`, and, through
  `other_libraries.py`, `timm:` and `open_clip:` models);
- `processor.py`: the image processor saved with a repaired model; `hub.py`: its model card and the upload;
- `original_layout.py`: the original DINOv2 checkpoint layout in both directions; `conversion.py`: `sinder convert`;
- `timm/`: timm models (directories, names, `hf-hub:` repositories in the local cache), `--model-kwargs` and the
  model-card presets, their files and preprocessing, and their exact conversion to and from transformers;
- `open_clip/`: the same for OpenCLIP image towers; `extras.py`: importing the optional libraries of the `[timm]`
  and `[open_clip]` extras.
"""
