"""Sub-commands after fine-tuning: qat, export, parity, evaluate, predict, benchmark.

Each entry registers its sub-parser; the work is done by the library modules they call.
"""
COMMANDS: list = []
