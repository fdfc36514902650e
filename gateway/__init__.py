"""Emporion: gateway."""
