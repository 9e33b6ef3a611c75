"""The embedded safety world: a generator of PKU-SafeRLHF-like data and its exact oracle judge."""
