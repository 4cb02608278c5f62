"""mmsr: multi-modal sequential recommendation toolkit (MMSR, CIKM 2023)."""

__version__ = "0.1.0"
