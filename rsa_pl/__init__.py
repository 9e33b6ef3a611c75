"""rsa-pl: Risk-aware Stepwise Alignment of language models (see PAPER.md)."""

__version__ = "0.1.0"
