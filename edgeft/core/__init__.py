"""The TF-free ground: errors, config, registry, run-directory files, progress, statistics, parity tiers and floor, formats table, lock, markdown, the ONNX opsets tf2onnx writes.
Imports only core and edgeft.device, never TensorFlow (both are import-linter contracts in pyproject.toml).
"""
