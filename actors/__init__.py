"""Emporion: actors."""
