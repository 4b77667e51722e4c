"""Converters from a Keras model to file bytes (TFLite, ONNX, metadata), TFLite Micro sources, golden vectors, the manifest.
May import train, edgeft.run, nn, data, core: no decisions here (quantize chooses, verify gates, pipeline publishes).
"""
