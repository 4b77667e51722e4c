"""Which tf.distribute strategy runs training, and who writes the run directory.

`auto` uses MirroredStrategy when more than one GPU is visible. `multiworker` reads TF_CONFIG
(MultiWorkerMirroredStrategy): every worker runs the same command, only the chief writes the run
directory, the others write to a temporary directory that is removed at the end. The batch size
flag is per replica: global batch = batch_size x replicas (scale the learning rate with it).
Multi-worker stage 1 runs on the chief alone (`local`), which then `broadcast`s what it trained.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np

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
    global_replicas: int | None = None   # a local scope: the replicas of the cluster it stands in for

    @property
    def replicas(self) -> int:
        return self.global_replicas or int(self.strategy.num_replicas_in_sync)

    def local(self) -> "Scope":
        """This process alone (the default strategy), batches still global: the multi-worker chief
        runs stage 1 in it, exactly as one process with batch_size x replicas would."""
        return Scope(tf.distribute.get_strategy(), "default", global_replicas=self.replicas)

    def broadcast(self, values: np.ndarray) -> np.ndarray:
        """The chief's `values` (float32) on every worker: each worker calls it at the same point with
        an array of the same shape (its own contents are ignored). A sum over the replicas where
        only the chief's first one contributes: x + 0 is x exactly."""
        values = np.asarray(values, np.float32)
        if self.name != "multiworker":
            return values
        per_worker = max(1, self.replicas // max(1, self.workers))
        zeros = np.zeros_like(values)

        def value(ctx):
            first = self.is_chief and ctx.replica_id_in_sync_group % per_worker == 0
            return tf.constant(values if first else zeros)
        summed = self.strategy.reduce(tf.distribute.ReduceOp.SUM,
                                      self.strategy.experimental_distribute_values_from_function(value), axis=None)
        return np.asarray(summed, np.float32)

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
