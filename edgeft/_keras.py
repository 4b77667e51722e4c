"""The one place edgeft imports TensorFlow and Keras.

tensorflow-model-optimization only supports Keras 2, so TF_USE_LEGACY_KERAS must be set before
TensorFlow is first imported, and every module takes `tf` and `keras` from here.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep CUDA/oneDNN banners off the user's screen

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

if os.environ["TF_USE_LEGACY_KERAS"] != "1":  # someone imported TF first with Keras 3
    raise ImportError("edgeft needs TF_USE_LEGACY_KERAS=1 set before TensorFlow is imported")

__all__ = ["tf", "keras"]
