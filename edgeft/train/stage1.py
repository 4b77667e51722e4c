"""Stage 1: the pretrained backbone frozen, a new head trained on cached features.

The backbone runs once per view over the training images (view 0: the images themselves; views
1..K-1: augmented by the run's policy, edgeft.data.augment), the knobs left at auto are chosen by
cross-validation of the head on those features (edgeft.train.choose), then the head trains on
them. `--augment-online` trains the full frozen model on fresh augmentations every epoch instead.
Under MultiWorkerMirroredStrategy the chief runs all of this alone and sends the head to the others.
"""
from __future__ import annotations

import logging
import json
import math
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgeft._keras import keras, tf
from edgeft.core import rundir
from edgeft.core.config import EdgeftConfig, build_config, to_dict
from edgeft.core.errors import UserError
from edgeft.core.progress import Progress
from edgeft.data.augment import Policy, augment_batch, flips, policy, view_uniforms
from edgeft.data.cache import RowFile, available_memory, check_scratch_space
from edgeft.data.datasets import ImageSet, Splits, make_dataset, row_dataset
from edgeft.layers import training_loss
from edgeft.nn.model import (copy_model, feature_extractor, freeze_backbone, head_kind, head_layers, head_model,
                             with_head)
from edgeft.train.callbacks import EpochLog
from edgeft.train.choose import (HEAD_OPTIONS, LABEL_SMOOTHING_OPTIONS, LR_HEAD_OPTIONS, PRIOR_ALPHA, Choice, Rows,
                                 choose, pool, sign_test)
from edgeft.train.distribute import Scope
from edgeft.train.recipe import class_weight_dict, head_epochs_for, lr_schedule

log = logging.getLogger(__name__)

# Stage-1 features stay in memory up to this size (and a fifth of the free RAM); larger ones go to
# a file in the run directory, read back a batch at a time (VGG16's flattened 7x7x512 features
# are 100 KB an image: 48,000 images would be 4.8 GB).
FEATURES_IN_RAM = 1 << 30

class Features:
    """Backbone features of one split, in memory or (too large for that) in a file."""

    def __init__(self, n: int, shape: tuple, where: Path):
        nbytes = n * int(np.prod(shape)) * 4
        free = available_memory()
        self.in_ram = nbytes <= FEATURES_IN_RAM and (free is None or nbytes <= 0.2 * free)
        self.shape = tuple(shape)
        if not self.in_ram:   # refused before the backbone runs, the estimate quoted
            check_scratch_space(nbytes, Path(where).parent, f"stage 1's features ({n:,} rows of "
                                f"{int(np.prod(shape)):,} float32: images x --augment-views)",
                                "use fewer --augment-views, free some space, or put the run on a larger disk")
        self.rows = np.empty((n,) + self.shape, np.float32) if self.in_ram else RowFile(where, n, self.shape)

    def put(self, start: int, f: np.ndarray) -> None:
        if self.in_ram:
            self.rows[start:start + len(f)] = f
        else:
            self.rows.write(start, f)

    def read(self, idx: np.ndarray) -> np.ndarray:
        return self.rows[idx] if self.in_ram else self.rows.read(idx)

    def dataset(self, y: np.ndarray, batch: int, shuffle: bool, seed: int, rows: np.ndarray | None = None):
        """(features, label) batches over all rows, or over `rows` only (`y`: labels of all rows)."""
        if rows is None:
            read, labels = self.read, y
        else:
            read, labels = (lambda idx: self.read(rows[idx])), np.asarray(y)[rows]
        ds = row_dataset(read, labels, self.shape, np.float32, batch, shuffle, seed)
        return ds.prefetch(tf.data.AUTOTUNE)

    def close(self) -> None:
        if not self.in_ram:
            self.rows.close()


def cache_features(extractor, images: ImageSet, batch: int, label: str, where: Path, views: int = 1,
                   pol: Policy | None = None, seed: int = 0) -> tuple[Features, np.ndarray]:
    """The frozen backbone run once over every view of `images` (streamed from the image cache):
    rows view-major (row v * n + i is view v of image i; view 0 is the image itself), and which
    rows are mirrored."""
    n = len(images)
    feats = Features(n * views, extractor.output_shape[1:], where)
    flipped = np.zeros(n * views, bool)
    with Progress(label, n * views) as bar:
        for v in range(views):
            u = view_uniforms(n, seed, v) if v else None
            start = 0
            for x, _ in make_dataset(images, batch):
                if v:
                    ub = u[start:start + len(x)]
                    x = augment_batch(x, ub, pol)
                    flipped[v * n + start:v * n + start + len(ub)] = flips(pol, ub)
                f = _predict_full_batch(extractor, x, batch)
                feats.put(v * n + start, f)
                start += len(f)
                bar.update(len(f))
    return feats, flipped


def _predict_full_batch(extractor, x, batch: int) -> np.ndarray:
    """The extractor's outputs for `x`, always called with `batch` rows: a short last batch is padded
    with zeros (BatchNorm runs in inference mode, so rows do not affect each other) and the padding
    dropped. One input shape means one trace: a new shape for the last partial batch traced the whole
    backbone again (VGG16 at 224 px: 43 s for the last 34 of 290 images)."""
    x = np.asarray(x)
    m = len(x)
    if m < batch:
        x = np.concatenate([x, np.zeros((batch - m,) + x.shape[1:], x.dtype)])
    return np.asarray(extractor.predict_on_batch(x), np.float32)[:m]


def _pooled(feats: Features, head: str, limit_rows: np.ndarray) -> np.ndarray:
    """The head's input after its pooling, for the rows the cross-validation uses."""
    return np.concatenate([pool(feats.read(limit_rows[s:s + 1024]), head) for s in range(0, len(limit_rows), 1024)])


CV_MAX_IMAGES = 3000   # the choice runs on at most this many training images (all their views)
CV_ROWS_BYTES = 1 << 30   # and on at most this many bytes of pooled features (VGG16 flattened: 100 KB a row)


def choose_settings(feats: Features, flipped: np.ndarray, splits: Splits, cfg: EdgeftConfig, views: int,
                    batch: int) -> Choice | None:
    """Cross-validation of the head (train.choose) for every knob left at auto, on the cached views.
    `--head auto`: the other knobs are chosen with GAP's head (the prior), then a Flatten head is
    cross-validated at the chosen policy and smoothing (each head learning rate still at auto) on the
    same images and folds; it replaces GAP only when a paired sign test over the held-out images says
    it is better (`choose.sign_test`, PRIOR_ALPHA), as every other option replaces its prior."""
    d, t, m = cfg.data, cfg.train, cfg.model
    arms = ("photo", "upright", "none") if d.augment_policy == "auto" else (d.augment_policy,)
    smooth = LABEL_SMOOTHING_OPTIONS if t.label_smoothing is None else (t.label_smoothing,)
    lrs = LR_HEAD_OPTIONS if t.lr_head is None else (t.lr_head,)
    spatial = int(np.prod(feats.shape[:-1]))   # a 1 x 1 feature map: Flatten is GAP, nothing to compare
    heads = (HEAD_OPTIONS if spatial > 1 else HEAD_OPTIONS[:1]) if m.head == "auto" else (m.head,)
    if len(arms) * len(smooth) * len(lrs) == 1 and len(heads) == 1:
        return None
    n = len(splits.train)
    width = max(int(np.prod(feats.shape)) if h == "flatten" else int(feats.shape[-1]) for h in heads)
    most = max(1, min(CV_MAX_IMAGES, CV_ROWS_BYTES // (4 * width * views)))
    rng = np.random.default_rng([t.seed, 31])
    keep = np.sort(rng.permutation(n)[:most]) if n > most else np.arange(n)
    rows_idx = np.concatenate([v * n + keep for v in range(views)])
    image = np.tile(np.arange(len(keep)), views)
    y, view = np.tile(splits.train.y[keep], views).astype(np.int64), np.repeat(np.arange(views), len(keep))
    coin = np.random.default_rng([t.seed, 32]).random(len(rows_idx)) < 0.5

    def rows(head: str) -> Rows:
        return Rows(_pooled(feats, head, rows_idx), y, image, view, flipped[rows_idx], coin)

    ncls = len(splits.classes)
    cw = class_weight_dict(cfg, splits.train.y, ncls)
    epochs = t.head_epochs or head_epochs_for(len(rows_idx), batch)
    common = dict(epochs=epochs, batch=batch, dropout=m.dropout, l2=m.l2, dense=m.dense, warmup=t.warmup,
                  schedule=t.head_schedule, class_weights=None if cw is None else [cw[i] for i in range(ncls)],
                  seed=t.seed)
    choice = choose(rows(heads[0]), ncls, arms=arms, smoothings=smooth, lrs=lrs, **common)
    choice.head = heads[0]
    for other in heads[1:]:
        choice = _against_prior_head(choice, other, rows, ncls, lrs, common)
    return choice


def _against_prior_head(prior: Choice, head: str, rows, ncls: int, lrs: tuple, common: dict) -> Choice:
    """`head` cross-validated at the prior's policy and smoothing (its own learning rate among `lrs`),
    on the same images and folds; the choice switches to it only when a one-sided paired sign test
    over the held-out images says it is better than the prior's choice at PRIOR_ALPHA."""
    t0 = time.time()
    scores = {prior.head: {"correct": int(prior.right.sum()), "n": int(prior.right.size), "lr_head": prior.lr_head}}
    try:
        alt = choose(rows(head), ncls, arms=(prior.policy,), smoothings=(prior.label_smoothing,), lrs=lrs, **common)
    except UserError as e:   # its heads do not fit in memory: the prior stays, and the record says why
        prior.head_scores = scores | {head: {"not_compared": str(e)}}
        log.info(f"stage 1: the {head} head was not compared (memory); the head stays {prior.head}")
        return prior
    p = sign_test(alt.right, prior.right)
    scores[head] = {"correct": int(alt.right.sum()), "n": int(alt.right.size), "lr_head": alt.lr_head,
                    "p_vs_prior": round(p, 4)}
    better = int(alt.right.sum()) > int(prior.right.sum()) and p < PRIOR_ALPHA
    chosen = replace(alt, label_smoothing=prior.label_smoothing, policy=prior.policy, scores=prior.scores,
                     folds=prior.folds, images=prior.images, groups=max(prior.groups, alt.groups)) if better else prior
    chosen.head = head if better else prior.head
    chosen.head_scores = scores
    chosen.seconds = round(prior.seconds + time.time() - t0, 2)
    return chosen


def _apply_choice(cfg: EdgeftConfig, policy_name: str, label_smoothing: float, lr_head: float,
                  head: str | None = None) -> EdgeftConfig:
    """The config with every stage-1 knob still at auto set to the given value."""
    d, t, m = cfg.data, cfg.train, cfg.model
    return replace(cfg, data=replace(d, augment_policy=policy_name if d.augment_policy == "auto" else d.augment_policy),
                   train=replace(t, label_smoothing=label_smoothing if t.label_smoothing is None else t.label_smoothing,
                                 lr_head=lr_head if t.lr_head is None else t.lr_head),
                   model=replace(m, head=(head or HEAD_OPTIONS[0]) if m.head == "auto" else m.head))


def _compile_head(net, cfg: EdgeftConfig, steps: int, scope: Scope):
    t = cfg.train
    with scope.strategy.scope():
        net.compile(keras.optimizers.Adam(lr_schedule(t.lr_head, steps, t.warmup, t.head_schedule)),
                    training_loss(t.label_smoothing), ["accuracy"], jit_compile=t.xla or None)


def train_head(model, splits: Splits, cfg: EdgeftConfig, run: Path, scope: Scope) -> tuple[keras.Model, EdgeftConfig, dict]:
    """Stage 1: backbone frozen. The head trains on cached features of a few augmented views of
    every training image (`--augment-views`), with the knobs left at auto chosen first by
    cross-validation on those features; `--augment-online` trains the full frozen model on fresh
    augmentations every epoch instead. Multi-worker: on the chief alone (`_train_head_on_chief`).

    Returns the model (a new one sharing the backbone when `--head auto` chose another head than the
    one it was built with), the config with every stage-1 choice filled in, and what stage 1 measured."""
    if scope.name == "multiworker":
        return _train_head_on_chief(model, splits, cfg, run, scope)
    t = cfg.train
    freeze_backbone(model)
    callbacks = [EpochLog(run, "head"), keras.callbacks.TensorBoard(str(run / rundir.LOGS / "head"))]
    batch = cfg.data.batch_size * scope.replicas
    ncls = len(splits.classes)
    info: dict = {}
    views = cfg.data.augment_views or 1
    needs_choice = (cfg.data.augment_policy == "auto" or t.label_smoothing is None or t.lr_head is None
                    or cfg.model.head == "auto")
    cw = class_weight_dict(cfg, splits.train.y, ncls)
    online = cfg.data.augment_online
    if online and not needs_choice:
        return _train_head_online(model, splits, cfg, scope, callbacks, cw, info)
    t0 = time.time()
    Path(run).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".features-", dir=run))
    try:
        with scope.strategy.scope():
            extractor, head = feature_extractor(model), head_model(model)
        pol = policy("photo" if cfg.data.augment_policy == "auto" else cfg.data.augment_policy)
        if pol.name == "flip-rotate-zoom" and views > 1:
            raise UserError("--augment-policy flip-rotate-zoom runs end to end only: add --augment-online, or "
                            "use photo / upright for cached views")
        f_train, flipped = cache_features(extractor, splits.train, batch, "stage 1: backbone features (train)",
                                          tmp / "train.f32", views, pol, t.seed)
        f_val, _ = cache_features(extractor, splits.val, batch, "stage 1: backbone features (val)", tmp / "val.f32")
        where = "in memory" if f_train.in_ram else f"on disk ({tmp.name}, removed after stage 1)"
        info["features_seconds"] = round(time.time() - t0, 2)
        log.info(f"stage 1: backbone features cached once, {where} ({len(splits.train)} x {views} view(s) + "
                 f"{len(splits.val)} images, {info['features_seconds']:.1f}s)")
        choice = choose_settings(f_train, flipped, splits, cfg, views, batch) if needs_choice else None
        if choice is not None:
            auto_head = cfg.model.head == "auto"
            cfg = _apply_choice(cfg, choice.policy, choice.label_smoothing, choice.lr_head, choice.head)
            info["choice"] = _describe_choice(choice)
            groups = f", heads in {choice.groups} groups to fit in memory" if choice.groups > 1 else ""
            log.info("stage 1: chose " + (f"head {cfg.model.head}, " if auto_head else "")
                     + f"policy {cfg.data.augment_policy}, smoothing {cfg.train.label_smoothing:g}, "
                     f"head lr {cfg.train.lr_head:g} ({choice.folds}-fold CV on {choice.images} "
                     f"images, {choice.seconds:.1f} s)")
            if head_kind(model) != cfg.model.head:   # --head auto chose another head than the model was built with
                with scope.strategy.scope():
                    model = with_head(model, cfg.model, ncls)
                    head = head_model(model)
            if groups:
                log.debug(f"stage 1: the cross-validation trained its{groups}")
        if cfg.model.head == "auto":   # nothing was compared (a 1 x 1 feature map, no other knob at auto)
            cfg = replace(cfg, model=replace(cfg.model, head=HEAD_OPTIONS[0]))
        t = cfg.train
        if online:
            f_train.close()
            f_val.close()
            return _train_head_online(model, splits, cfg, scope, callbacks, cw, info)
        n = len(splits.train)
        keep = np.arange(n * views)
        if cfg.data.augment_policy != "none" and not policy(cfg.data.augment_policy).mirrors:
            keep = keep[~flipped]   # upright: the mirrored views stay out
        if cfg.data.augment_policy == "none":
            keep = keep[:n]
        y = np.tile(splits.train.y, views)
        epochs = t.head_epochs or head_epochs_for(len(keep), batch)
        cfg = replace(cfg, train=replace(t, head_epochs=epochs))
        info.update(rows=int(len(keep)), views=int(views), epochs=epochs)
        _compile_head(head, cfg, epochs * math.ceil(len(keep) / batch), scope)
        head.fit(f_train.dataset(y, batch, True, t.seed, rows=keep),
                 validation_data=f_val.dataset(splits.val.y, batch, False, 0),
                 epochs=epochs, callbacks=callbacks, verbose=0, class_weight=cw)
        f_train.close()
        f_val.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, cfg, info


def _train_head_on_chief(model, splits: Splits, cfg: EdgeftConfig, run: Path, scope: Scope):
    """Multi-worker stage 1: the chief runs one process's stage 1 (features cached, the choice, the
    head) on a copy of the model outside the strategy, with the global batch; then every worker
    takes the chief's head weights and settings (a broadcast), so stage 2 starts from one model.
    The other workers wait meanwhile: stage 1 on cached features is cheap next to stage 2."""
    freeze_backbone(model)
    # every worker reads the weights: BatchNorm's moving statistics are read by an all-reduce
    weights = model.get_weights()
    head = []
    if scope.is_chief:
        local = copy_model(model, weights)
        local, cfg, info = train_head(local, splits, cfg, run, scope.local())
        head = [w for layer in head_layers(local) for w in layer.get_weights()]
        text = np.frombuffer(json.dumps({"config": to_dict(cfg), "info": info}).encode(), np.uint8)
        log.info(f"stage 1: trained on the chief; its head and settings go to the {scope.workers - 1} other worker(s)")
    else:
        text = np.zeros(0, np.uint8)
        log.info("stage 1: the chief trains the head; waiting for its weights")
    # first the settings (they may name another head than the workers' models were built with: --head
    # auto), then the head's weights, in the shapes of the head every worker now has
    size = int(scope.broadcast(np.array([len(text)]))[0])
    text = scope.broadcast(text.astype(np.float32) if scope.is_chief else np.zeros(size, np.float32))
    if not scope.is_chief:
        sent = json.loads(text.astype(np.uint8).tobytes())
        cfg, info = build_config(sent["config"]), sent["info"]
    if head_kind(model) != cfg.model.head:
        with scope.strategy.scope():
            model = with_head(model, cfg.model, len(splits.classes))
    layers = head_layers(model)
    n = sum(w.size for layer in layers for w in layer.get_weights())
    flat = scope.broadcast(np.concatenate([np.ravel(w).astype(np.float32) for w in head]) if scope.is_chief
                           else np.zeros(n, np.float32))
    at = 0
    for layer in layers:
        weights = []
        for w in layer.get_weights():
            weights.append(flat[at:at + w.size].reshape(w.shape))
            at += w.size
        layer.set_weights(weights)
    return model, cfg, info


def _train_head_online(model, splits, cfg, scope, callbacks, cw, info):
    """Stage 1 end to end: every epoch runs the frozen backbone on fresh augmentations."""
    t = cfg.train
    epochs = t.head_epochs or head_epochs_for(len(splits.train), cfg.data.batch_size * scope.replicas)
    cfg = replace(cfg, train=replace(t, head_epochs=epochs))
    steps = epochs * math.ceil(len(splits.train) / (cfg.data.batch_size * scope.replicas))
    _compile_head(model, cfg, steps, scope)
    model.fit(scope.dataset(splits.train, cfg.data.batch_size, True, cfg.data.augment_policy, t.seed),
              validation_data=scope.dataset(splits.val, cfg.data.batch_size),
              steps_per_epoch=scope.steps(splits.train, cfg.data.batch_size),
              validation_steps=scope.steps(splits.val, cfg.data.batch_size),
              epochs=epochs, callbacks=callbacks, verbose=0, class_weight=cw)
    info.update(online=True, epochs=epochs)
    return model, cfg, info


def _describe_choice(c: Choice) -> dict:
    return {"folds": c.folds, "images": c.images, "seconds": c.seconds, "groups": c.groups, "policy": c.policy,
            "label_smoothing": c.label_smoothing, "lr_head": c.lr_head, "scores": c.scores,
            **({"head": c.head, "heads": c.head_scores} if c.head_scores else {})}
