"""The choice's batched heads are stage 1's head: the same layers, loss and optimizer as the Keras
head (edgeft.nn.model.build_head) trained on the same features, and they fit in memory (issue 26)."""
from __future__ import annotations

import numpy as np
import pytest

from edgeft.core.config import build_config
from edgeft.core.errors import UserError

FEAT = (2, 2, 6)   # backbone features [h, w, c]: Flatten gives 24 inputs, GAP 6


def _data(n_img=48, views=2, n_classes=3, seed=0):
    from edgeft.train.choose import Rows

    rng = np.random.default_rng(seed)
    y_img = np.arange(n_img) % n_classes
    centres = rng.normal(0, 1, (n_classes,) + FEAT).astype(np.float32)
    f = np.concatenate([centres[y_img] + rng.normal(0, 1.0, (n_img,) + FEAT).astype(np.float32)
                        for _ in range(views)])
    n = n_img * views
    rows = Rows(None, np.tile(y_img, views), np.tile(np.arange(n_img), views), np.repeat(np.arange(views), n_img),
                rng.random(n) < 0.5, rng.random(n) < 0.5)
    return f, rows


CASES = {   # the seed's head (hidden Dense, dropout 0.5) and the default recipe's (GAP, dropout 0.2)
    "flatten-dense": dict(head="flatten", dense=8, dropout=0.5, l2=1e-3, ls=0.1, cw=[1.0, 2.0, 0.5]),
    "gap": dict(head="gap", dense=0, dropout=0.2, l2=1e-4, ls=0.0, cw=None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_heads_train_exactly_like_the_keras_head(case):
    """Heads of the choice against the Keras head stage 1 builds, trained on the same
    features by Keras itself (train_on_batch: Keras' Adam with stage 1's schedule, Keras' loss with
    label smoothing and class weights, the L2 regularizers), from the same initial weights, on the
    same batches (the head's own rows of each shared batch) with the same dropout masks."""
    from edgeft._keras import keras, tf
    from edgeft.layers import training_loss
    from edgeft.nn.model import apply_layers, build_head
    from edgeft.train.choose import HeadTraining, batch_order, dropout_keep, init_head, head_dims, plan, pool, \
        train_heads
    from edgeft.train.recipe import lr_schedule

    c = CASES[case]
    f, rows = _data()
    rows.x = pool(f, c["head"])
    C, R = 3, len(rows.y)
    h = HeadTraining(C, epochs=3, batch=16, dropout=c["dropout"], l2=c["l2"], dense=c["dense"], warmup=0.1,
                     schedule="cosine", seed=5)
    p = plan(rows, C, ("upright", "none"), (c["ls"],), (3e-3,), c["cw"], seed=5)
    batched = [None] * len(p.heads)
    for lo, hi, params in train_heads(rows.x, rows.y, p.masks, p.row_w, p.ls, p.lr, h):
        for g in range(lo, hi):
            batched[g] = [w[g - lo] for w in params]
    order = batch_order(R, h.epochs, h.batch, h.seed)
    dims = head_dims(rows.x.shape[1], h.dense, C)
    mcfg = build_config({"head": c["head"], "dense": c["dense"], "dropout": c["dropout"], "l2": c["l2"]}).model
    # the masks as the batched program draws them: under XLA (XLA's stateless generator differs from TF's kernel)
    masks_at = tf.function(lambda t: dropout_keep(shape, h.dropout, h.seed, t), jit_compile=True)
    shape = (h.batch, rows.x.shape[1]) if not h.dense else (len(p.heads), h.batch, h.dense)
    for g in (0, 4):   # one head of each arm, of two folds (all heads run the same code)
        inputs = keras.Input(FEAT)
        model = keras.Model(inputs, apply_layers(build_head(mcfg, C), inputs))
        dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
        assert [tuple(layer.kernel.shape) for layer in dense] == dims
        init = init_head(dims, h.seed, g)
        for i, layer in enumerate(dense):
            layer.set_weights([init[i], init[len(dims) + i]])
        keep = tf.Variable(np.zeros(1, np.float32), shape=tf.TensorShape(None))
        model.get_layer("head_dropout")._random_generator.dropout = \
            lambda x, rate, noise_shape=None: tf.ensure_shape(x * keep, x.shape)
        model.compile(keras.optimizers.Adam(lr_schedule(float(p.lr[g]), len(order), h.warmup, h.schedule)),
                      training_loss(float(p.ls[g])))
        for t, idx in enumerate(order):
            pos = np.flatnonzero((idx < R) & (p.masks[g][np.minimum(idx, R - 1)] > 0))
            assert len(pos), "every batch holds rows of every head (an empty batch is not compared)"
            mask = masks_at(tf.constant(t)).numpy()
            keep.assign(mask[pos] if not h.dense else mask[g][pos])
            model.train_on_batch(f[idx[pos]], rows.y[idx[pos]], sample_weight=p.row_w[idx[pos]])
        want = [layer.kernel.numpy() for layer in dense] + [layer.bias.numpy() for layer in dense]
        for a, b in zip(batched[g], want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=f"head {g} of {case}")
        moved = max(np.abs(w - i).max() for w, i in zip(want, init))
        assert moved > 10 * 2e-5   # the heads really trained: the tolerance is far below what they moved


def test_heads_train_the_same_in_groups():
    """Heads that do not fit in memory together train in groups: each head's result is its own."""
    from edgeft.train.choose import HeadTraining, plan, pool, train_heads

    f, rows = _data()
    rows.x = pool(f, "flatten")
    h = HeadTraining(3, epochs=3, batch=16, dropout=0.5, l2=1e-4, dense=8, warmup=0.1, schedule="cosine", seed=2)
    p = plan(rows, 3, ("photo", "upright"), (0.0, 0.1), (1e-3,), None, seed=2)
    one = next(train_heads(rows.x, rows.y, p.masks, p.row_w, p.ls, p.lr, h))[2]
    groups = list(train_heads(rows.x, rows.y, p.masks, p.row_w, p.ls, p.lr, h, per_group=6))
    assert [(lo, hi) for lo, hi, _ in groups] == [(0, 6), (6, 12)]
    for k, w in enumerate(one):
        np.testing.assert_allclose(np.concatenate([g[2][k] for g in groups]), w, rtol=1e-5, atol=1e-6)


def test_the_seeds_head_on_vgg16_224_is_planned_within_memory():
    """VGG16 at 224 px, Flatten -> Dense 256 (the seed's head): 25,088 features. The choice's heads
    have the shapes stage 1's head has (no 25,088 x 25,088 layer) and train in groups that fit;
    where not even one fits, a one-line error comes before anything is allocated."""
    from edgeft.train.choose import BYTES_PER_PARAM, GROUP_BYTES, head_dims, heads_per_group

    d = 7 * 7 * 512
    assert head_dims(d, 256, 10) == [(d, 256), (256, 10)]
    assert head_dims(1280, 0, 5) == [(1280, 5)]
    per_head = BYTES_PER_PARAM * (d * 256 + 256 + 256 * 10 + 10)
    rows = 4 * 3000   # the most the choice takes: CV_MAX_IMAGES x 4 views
    g = heads_per_group(36, d, 256, 10, rows, free=20 << 30)
    assert g * per_head <= GROUP_BYTES and 1 <= g < 36
    assert heads_per_group(36, 1280, 0, 10, rows, free=20 << 30) == 36   # the default head: one program
    with pytest.raises(UserError, match=r"free: give --augment-policy"):
        heads_per_group(36, d, 256, 10, rows, free=1 << 30)


def test_one_image_does_not_turn_the_choice():
    """294 against 293 correct of 320 images (issue 27's case): fold noise, the prior stays; a clear paired
    advantage wins."""
    from edgeft.train.choose import prior_unless_better, sign_test

    rng = np.random.default_rng(0)
    prior = rng.random(320) < 293 / 320
    close = prior.copy()
    wrong = np.flatnonzero(~prior)
    close[wrong[:3]] = True                      # right on 3 images the prior gets wrong ...
    close[np.flatnonzero(prior)[:2]] = False     # ... and wrong on 2 it gets right: 294 vs 293
    assert close.sum() == prior.sum() + 1
    assert prior_unless_better([prior, close], [int(prior.sum()), int(close.sum())]) == 0
    clear = prior.copy()
    clear[wrong[:12]] = True                     # 12 more right, none lost
    assert sign_test(clear, prior) < 0.001
    assert prior_unless_better([prior, close, clear], [int(v.sum()) for v in (prior, close, clear)]) == 2
    assert sign_test(prior, prior) == 1.0
