"""GPT-2 training system for architecture and optimizer research.

Layout (arrows point one way): ``trainer`` -> ``model``, ``data``, ``optim``, ``track``.
The model package knows nothing of training.
"""

__version__ = "0.1.0"
