"""walsh: ternary, hyper-complex structured language models (single-device PyTorch).

Submodules: ``algebra`` (Cayley-Dickson tables, Hadamard), ``quant`` (ternary, 8-bit acts),
``layers``, ``embedding``, ``loss``, ``models``, ``generate``.
"""

__version__ = "0.1.0"
