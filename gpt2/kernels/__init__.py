"""Native kernels the model's CPU path uses where PyTorch has no fused operator.

Each is a plain C file here, compiled on first use for this machine (:mod:`gpt2.kernels.build`) and
called through ctypes, with the PyTorch formulation it replaces as the fallback when no compiler is
available (said once in the log, never silently).
"""

from gpt2.kernels.xent import fused_xent_available, xent_rows

__all__ = ["fused_xent_available", "xent_rows"]
