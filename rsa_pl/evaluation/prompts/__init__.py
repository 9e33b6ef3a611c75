"""The shipped judge prompts and refusal rules (text files read with importlib.resources)."""
