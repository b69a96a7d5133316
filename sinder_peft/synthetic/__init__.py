"""Models and images made here, so that everything runs and is tested without a download.

- `demo.py`: the planted-defect demo model (`--model demo`) and the bundled demo images;
- `tiny_models.py`: tiny random models of every supported family, with their image processors;
- `planting.py`: a known defect planted into a tiny model of any family, and images that trigger it;
- `random_planting.py`: harder planted DINOv2s at random initialization, including defects the weights' linearization
  does not see.
"""
