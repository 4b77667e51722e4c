"""Which tf.distribute strategy runs training, and who writes the run directory.

`auto` uses MirroredStrategy when more than one GPU is visible. `multiworker` reads TF_CONFIG
(MultiWorkerMirroredStrategy): every worker runs the same command, only the chief writes the run
directory, the others write to a temporary directory that is removed at the end. The batch size
flag is per replica: global batch = batch_size x replicas (scale the learning rate with it).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from edgeft._keras import keras, tf
from edgeft.core.config import TrainConfig
from edgeft.core.errors import UserError
from edgeft.data.datasets import make_dataset


@dataclass
class Scope:
    strategy: object
    name: str
    is_chief: bool = True
    workers: int = 1
    _tmp: str | None = field(default=None, repr=False)

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    @property
    def can_cache_features(self) -> bool:
        # predict() over a multi-worker strategy would need every worker to agree on the cache;
        # single-host strategies can run the backbone once and train the head on the features.
        return self.name != "multiworker"

    def scratch(self, name: str) -> str:
        """A throw-away path for a non-chief worker's files."""
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="edgeft-worker-")
        path = os.path.join(self._tmp, name)
        os.makedirs(path, exist_ok=True)
        return path

    def dataset(self, images, batch_size: int, shuffle: bool = False, augment: bool = False, seed: int = 0):
        """The training input for `fit` under this strategy (`batch_size` per replica).

        Multi-worker: each worker builds its own pipeline over its own shard of the rows
        (`distribute_datasets_from_function`), so it reads only its share of the image cache.
        Single-host strategies get one pipeline of global batches, split across local replicas.
        """
        if self.name != "multiworker":
            return make_dataset(images, batch_size * self.replicas, shuffle, augment, seed)

        def per_worker(ctx):
            # repeated: Keras keeps one iterator over a distributed dataset for the whole fit
            return make_dataset(images, ctx.get_per_replica_batch_size(batch_size * self.replicas), shuffle, augment,
                                seed, shard=(ctx.num_input_pipelines, ctx.input_pipeline_id), repeat=True)
        return self.strategy.distribute_datasets_from_function(per_worker)

    def steps(self, images, batch_size: int) -> int | None:
        """steps_per_epoch / validation_steps for `fit` on `dataset(images, batch_size)`: None
        (to the end of the data) except under multiworker, whose input repeats."""
        if self.name != "multiworker":
            return None
        share = (len(images) - len(images) % self.workers) // self.workers
        per_step = batch_size * max(1, self.replicas // self.workers)
        return max(1, -(-share // per_step))

    def cleanup(self) -> None:
        # the mixed-precision policy is process-global: leave the process as we found it
        keras.mixed_precision.set_global_policy("float32")
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        raise UserError("--strategy multiworker needs the TF_CONFIG environment variable (see docs/scaling.md)")
    try:
        conf = json.loads(raw)
        conf["cluster"]["worker"], conf["task"]["type"], conf["task"]["index"]
    except (ValueError, KeyError, TypeError):
        raise UserError("TF_CONFIG must be JSON with cluster.worker and task.type/index") from None
    return conf


def _is_chief(conf: dict) -> bool:
    task = conf["task"]
    if "chief" in conf["cluster"]:
        return task["type"] == "chief"
    return task["type"] == "worker" and int(task["index"]) == 0


def make_scope(train: TrainConfig) -> Scope:
    gpus = tf.config.list_physical_devices("GPU")
    if train.mixed_precision:
        if not gpus:
            raise UserError("--mixed-precision needs a GPU (float16 on CPU is slower, not faster); "
                            "no GPU is visible")
        keras.mixed_precision.set_global_policy("mixed_float16")
    name = train.strategy
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "multiworker":
        conf = _tf_config()
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        return Scope(strategy, name, is_chief=_is_chief(conf), workers=len(conf["cluster"]["worker"])
                     + len(conf["cluster"].get("chief", [])))
    if name == "mirrored":
        # on a machine without GPUs, mirror over the logical CPU devices (how the tests run it)
        devices = None if gpus else [d.name for d in tf.config.list_logical_devices("CPU")]
        return Scope(tf.distribute.MirroredStrategy(devices=devices), name)
    return Scope(tf.distribute.get_strategy(), "default")
