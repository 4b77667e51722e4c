"""The one place edgeft imports TensorFlow and Keras.

tensorflow-model-optimization only supports Keras 2, so TF_USE_LEGACY_KERAS must be set before
TensorFlow is first imported, and every module takes `tf` and `keras` from here. That variable is
the one environment change importing edgeft makes, and only with TensorFlow; log levels are the
command line's choice (edgeft/core/logs.py), never set here.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

if os.environ["TF_USE_LEGACY_KERAS"] != "1":  # someone imported TF first with Keras 3
    raise ImportError("edgeft needs TF_USE_LEGACY_KERAS=1 set before TensorFlow is imported")

__all__ = ["tf", "keras"]
