"""Rashomon-set interaction scoring: how much feature interactions vary across equally good models."""
