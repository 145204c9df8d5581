"""Small foundations shared by every layer (layer 1: imports nothing of lmforge)."""
