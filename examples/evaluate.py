"""Evaluate ViTs side by side: kNN, linear segmentation and depth probes, unsupervised segmentation, defect figures.

    python examples/evaluate.py demo runs/demo --knn-data path/to/knn --seg-data path/to/seg --output-dir eval-out
    python examples/evaluate.py demo runs/demo --depth-data path/to/nyu --unsupervised-data path/to/voc \
        --output-dir eval-dense
    accelerate launch --num_processes 2 examples/evaluate.py facebook/dinov2-base runs/base \
        --knn-data imagenet-1k --knn-max-train 100000 --output-dir eval-base

Several processes share the feature extraction; the probes run on the main process. Same flags as
`sinder evaluate` (`python examples/evaluate.py --help`); writes evaluation.json, evaluation.md and the figures.
"""

from sinder_peft.evaluation.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
