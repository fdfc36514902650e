"""Emporion: simulations."""
