"""Attacks that read only what the threat model grants the adversary: a device view plus public data."""
