"""`sinder evaluate`: the numbers that show a repaired backbone lost its defects and kept its features.

- `arguments.py`: `EvaluationArguments`;
- `evaluate.py`: the job (`evaluate`, `evaluate_models`, the command line) and its outputs;
- `context.py`: what the sections of one evaluation share (data, cache, processes; cached features and masks);
- `sections.py`: one model's kNN, linear-probe and defect sections;
- `dense_sections.py`: one model's depth-probe and unsupervised-segmentation sections;
- `probes.py`: the probes' math (kNN, linear segmentation probe, IoU);
- `depth_probe.py`: the linear depth probe and the depth metrics;
- `clustering.py`: k-means on patch tokens and the Hungarian matching of clusters to classes;
- `cause.py`, `cause_head.py`, `cause_losses.py`, `dense_crf.py`: CAUSE, the paper's unsupervised segmentation
  protocol (its fits and scoring, its head and bank, its losses, its dense CRF);
- `features.py`: feature extraction shared between processes, and its cache;
- `image_sources.py`, `datasets.py`, `depth_data.py`: where the images come from, and the kNN, segmentation and
  depth data layouts.
"""
