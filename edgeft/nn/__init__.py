"""The one flat Keras model (backbone + head, edgeft.layers.Preprocess inside), what a .keras may name, the runners of model files.
May import data, core, edgeft.layers, edgeft._keras and edgeft.device; nothing above.
"""
