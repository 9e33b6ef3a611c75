"""Generation, judges and metrics for evaluating policies."""
