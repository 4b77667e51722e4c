"""Quantization-aware training, its quantize configs, and the int8 choice (PTQ vs QAT, judged as the gate judges).
May import export (the converters), train, edgeft.run, nn, data, core; never verify, pipeline or cli.
"""
