"""Integrations of flash_varlen with other libraries.

Each integration lives in its own submodule and imports its library only when used, so importing
``flash_varlen`` or this package never requires any of those libraries:

- ``flash_varlen.integrations.transformers``: the attention implementation ``"flash_varlen"``
  for Hugging Face transformers models (call its ``register()`` first).
"""
