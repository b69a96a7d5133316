"""Models in and out: loading a backbone (`loading.py`: Hub ids, local directories, `demo`), the image processor
saved with a repaired model (`processor.py`), the model card and upload to the Hub (`hub.py`), the original
DINOv2 checkpoint layout in both directions (`original_layout.py`), and `sinder convert` (`conversion.py`)."""
