"""Preference data: loading real datasets into one canonical row format (sources.py)."""
