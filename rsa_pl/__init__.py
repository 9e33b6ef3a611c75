"""rsa-pl: Risk-aware Stepwise Alignment of language models (see docs/method.md)."""

__version__ = "0.1.0"
