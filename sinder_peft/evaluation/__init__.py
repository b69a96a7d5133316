"""`sinder evaluate`: the numbers that show a repaired backbone lost its defects and kept its features.

- `arguments.py`: `EvaluationArguments`;
- `evaluate.py`: the job (`evaluate`, `evaluate_models`, the command line) and its outputs;
- `sections.py`: one model's kNN, linear-probe and defect sections;
- `probes.py`: the probes' math (kNN, linear segmentation probe, IoU);
- `features.py`: feature extraction shared between processes, and its cache;
- `image_sources.py`, `datasets.py`: where the images come from, and the kNN and segmentation data layouts.
"""
