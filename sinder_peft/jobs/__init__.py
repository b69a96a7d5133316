"""The jobs a user runs, on top of everything else: `sinder repair` (`repair.py`, with its arguments, setup, export
and report in `repair_*.py`) and `sinder diagnose` (`diagnose.py`). `sinder evaluate` lives in `evaluation/`."""
