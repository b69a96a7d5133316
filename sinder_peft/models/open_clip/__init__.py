"""OpenCLIP image towers in and out: `loading.py` (the `ARCH[/PRETRAINED_OR_FILE]` names, loading offline, the
preprocessing, saving) and `conversion.py` (the exact conversion to and from transformers' `CLIPVisionModel`).

The subpackage is named after the library it reads; its modules import the library itself absolutely
(`import_extra("open_clip", ...)`), never as a relative name, so it does not shadow it.
"""
