"""timm models in and out.

- `loading.py`: the `NAME_OR_DIR` of `--model timm:...` (a directory in timm's Hub layout, a timm model name, or a
  Hub repository `hf-hub:ORG/NAME` from the local Hugging Face cache), the preprocessing, saving in timm's layout;
- `arguments.py`: the keyword arguments of `timm.create_model` given as JSON (`--model-kwargs`), layers named by
  dotted names inside timm and torch; `presets.py`: those of the model cards of well-known Hub repositories;
- `links.py`, `plans.py`, `conversion.py`: the exact conversion to and from the transformers class of the same
  architecture.

The subpackage is named after the library it reads. Its modules import the library itself absolutely
(`import_extra("timm", ...)`: `sinder_peft.models.timm` is never imported as `timm`), so it does not shadow it.
"""
