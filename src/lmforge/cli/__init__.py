"""Entry points (layer 5): argument parsing and wiring, no logic of their own."""
