"""Images in: one preprocessing function (`preprocessing.py`), the datasets of `--data` (`datasets.py`: folders,
file lists, 🤗 datasets), and how a repair reads them (`batching.py`: batches, the selection sample, each process's
share)."""
