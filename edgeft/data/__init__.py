"""Image folder -> decoded on-disk image cache -> splits -> tf.data pipelines; the offline demo's folder.
May import core, edgeft.device and edgeft._keras (TensorFlow only inside the tf.data functions).
"""
