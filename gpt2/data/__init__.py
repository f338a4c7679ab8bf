"""Data: the offline GPT-2 tokenizer, corpus preparation and training batches.

- ``tokenizer``: GPT-2 BPE built from locally installed files (``get_encoding``, ``encode``, ``decode``).
- ``prepare``: corpus -> ``<data-dir>/<dataset>/train.bin``, ``val.bin``, ``meta.json`` (``prepare``,
  ``ensure_prepared``, the ``DATASETS`` registry). Imports neither torch nor ``datasets``.
- ``loader``: ``TokenBatches``, reproducible per-rank windows from the bins (imports torch).

Import the submodules directly; this package imports nothing so the CLI starts fast.
"""
