"""The version of sinder-peft, in one place: the package exports it as `sinder_peft.__version__`, and the files a
repair or an evaluation writes record it."""

__version__ = "0.6.0"
