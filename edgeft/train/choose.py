"""The data-dependent knobs of stage 1 chosen by measurement: k-fold cross-validation of the head
on the cached features.

What is chosen (each only where the user left it at auto): whether to augment at all and whether
the augmented views may be mirrored (policy photo, upright or none), label smoothing (0 or 0.1)
and the head's learning rate.
Folds are grouped by source image: every view of an image sits in the same fold, and a fold is
scored on its images themselves (view 0), never on their augmented views.

Every option x fold is one head in a single batched TensorFlow program (weights [G, D, C]), trained
as stage 1 trains its head: Adam, the same epochs and batch size, warm-up then cosine, dropout,
L2, label smoothing, class weights. A held-out fold's rows are masked out of its heads' loss.

The flip arms are compared at equal size: `upright` trains on view 0 and the views not mirrored,
`photo` on view 0 and a random half of all augmented views (mirrored or not), so neither has more
rows than the other; the final head of an `upright` choice trains on the unmirrored views only.
`none` trains on view 0 alone: whether augmented views help at all is the question it answers.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np

LABEL_SMOOTHING_OPTIONS = (0.0, 0.1)
LR_HEAD_OPTIONS = (1e-3, 3e-3)   # 3e-4 was also tried, and chosen in none of 12 runs of tools/bench_recipe.py
FOLDS = 3


@dataclass
class Rows:
    """Stage 1's training rows: pooled features of every view of every training image."""
    x: np.ndarray          # [R, D] float32 (the head's input after its pooling)
    y: np.ndarray          # [R] labels
    image: np.ndarray      # [R] index of the source image
    view: np.ndarray       # [R] 0: the image itself
    flipped: np.ndarray    # [R] the view is mirrored
    coin: np.ndarray       # [R] a fair coin per row (the photo arm's equal-size half)


@dataclass
class Choice:
    policy: str | None
    label_smoothing: float
    lr_head: float
    scores: list[dict] = field(default_factory=list)   # one per option: accuracy, correct, n
    seconds: float = 0.0
    folds: int = FOLDS
    images: int = 0


def folds_by_image(y_image: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold for every source image, stratified by class (`y_image`: the label of each image)."""
    rng = np.random.default_rng([seed, 4243])
    fold = np.zeros(len(y_image), np.int64)
    for c in np.unique(y_image):
        idx = np.flatnonzero(y_image == c)
        rng.shuffle(idx)
        fold[idx] = (np.arange(len(idx)) + rng.integers(k)) % k
    return fold


def arm_mask(rows: Rows, arm: str | None) -> np.ndarray:
    if arm == "upright":
        return (rows.view == 0) | ~rows.flipped
    if arm == "photo":
        return (rows.view == 0) | rows.coin
    if arm == "none":
        return rows.view == 0
    return np.ones(len(rows.y), bool)


def choose(rows: Rows, n_classes: int, *, arms: tuple, smoothings: tuple, lrs: tuple, epochs: int, batch: int,
           dropout: float, l2: float, dense: int, warmup: float, schedule: str, class_weights: np.ndarray | None,
           seed: int, folds: int = FOLDS) -> Choice:
    """The best (arm, label smoothing, learning rate) by cross-validated accuracy on the images
    themselves; ties go to the earlier option of each list (the defaults come first)."""
    from edgeft._keras import tf

    t0 = time.time()
    n_img = int(rows.image.max()) + 1
    y_img = np.zeros(n_img, np.int64)
    y_img[rows.image[rows.view == 0]] = rows.y[rows.view == 0]
    fold_img = folds_by_image(y_img, folds, seed)
    fold_row = fold_img[rows.image]
    options = list(itertools.product(arms, smoothings, lrs))
    heads = [(o, f) for o in options for f in range(folds)]
    G, R, D = len(heads), len(rows.y), rows.x.shape[1]
    train_mask = np.stack([arm_mask(rows, o[0]) & (fold_row != f) for o, f in heads]).astype(np.float32)
    cw = np.ones(n_classes, np.float32) if class_weights is None else np.asarray(class_weights, np.float32)
    row_w = cw[rows.y]
    ls = np.array([o[1] for o, _ in heads], np.float32)
    lr = np.array([o[2] for o, _ in heads], np.float32)

    rng = np.random.default_rng([seed, 77])
    # every epoch runs over all rows; a head's loss counts only its own (its arm, not its fold)
    total = max(1, epochs * -(-R // batch))
    warm = int(warmup * total)

    def glorot(shape):
        lim = np.sqrt(6.0 / (shape[-2] + shape[-1]))
        return rng.uniform(-lim, lim, shape).astype(np.float32)

    dims = ([D, dense] if dense else []) + [n_classes]
    ins = [D] + dims[:-1]
    weights = [tf.Variable(glorot((G, a, b))) for a, b in zip(ins, dims)]
    biases = [tf.Variable(np.zeros((G, b), np.float32)) for b in dims]
    params = weights + biases
    m = [tf.Variable(tf.zeros_like(p)) for p in params]
    v = [tf.Variable(tf.zeros_like(p)) for p in params]
    # one extra all-zero row, masked out of every head: it pads the last batch of each epoch
    X = tf.constant(np.concatenate([rows.x, np.zeros((1, D), np.float32)]), tf.float32)
    Y = tf.constant(np.concatenate([rows.y, [0]]), tf.int32)
    MASK = tf.constant(np.concatenate([train_mask, np.zeros((G, 1), np.float32)], axis=1))
    W_ROW = tf.constant(np.concatenate([row_w, [0.0]]).astype(np.float32))
    LS, LR = tf.constant(ls), tf.constant(lr)
    per_epoch = -(-R // batch)
    order = np.full((epochs, per_epoch * batch), R, np.int64)
    for e in range(epochs):
        order[e, :R] = rng.permutation(R)
    order = order.reshape(epochs * per_epoch, batch)
    # a batch's last padded slots stay at the dummy row; a step's heads divide by their own count

    def forward(xb, training):
        # the input is shared by every head ([B, D]); a hidden layer makes it per head ([G, B, H])
        if len(weights) == 1:
            if training and dropout:
                xb = tf.nn.dropout(xb, dropout)   # one mask for all heads (they differ in their options)
            return tf.einsum("bd,gdc->gbc", xb, weights[0]) + biases[0][:, None, :]
        h = tf.nn.relu(tf.einsum("bd,gdh->gbh", xb, weights[0]) + biases[0][:, None, :])
        if training and dropout:
            h = tf.nn.dropout(h, dropout)
        return tf.einsum("gbh,ghc->gbc", h, weights[1]) + biases[1][:, None, :]

    def step(idx, t):
        xb, yb = tf.gather(X, idx), tf.gather(Y, idx)
        present = tf.gather(MASK, idx, axis=1)
        mb = present * tf.gather(W_ROW, idx)[None]
        onehot = tf.one_hot(yb, n_classes)[None]
        target = onehot * (1.0 - LS[:, None, None]) + LS[:, None, None] / n_classes
        with tf.GradientTape() as tape:
            logits = forward(xb, True)
            ce = -tf.reduce_sum(target * tf.nn.log_softmax(logits), axis=-1)         # [G, B]
            count = tf.maximum(tf.reduce_sum(tf.cast(present > 0, tf.float32), 1), 1.0)
            loss = tf.reduce_sum(ce * mb, axis=1) / count
            if l2:
                loss += l2 * sum(tf.reduce_sum(tf.square(w), axis=[1, 2]) for w in weights)
            total_loss = tf.reduce_sum(loss)   # heads are independent: one sum, each its own gradient
        grads = tape.gradient(total_loss, params)
        tf_t = tf.cast(t, tf.float32)
        frac = tf.clip_by_value((tf_t - warm) / max(1, total - warm), 0.0, 1.0)
        after = 0.5 * (1 + tf.cos(np.pi * frac)) if schedule == "cosine" else 1.0
        lr_t = LR * tf.where(tf_t < warm, tf_t / max(1, warm), after)
        b1, b2, eps = 0.9, 0.999, 1e-7
        corr = tf.sqrt(1 - b2 ** (tf_t + 1)) / (1 - b1 ** (tf_t + 1))
        for p, g, mm, vv in zip(params, grads, m, v):
            mm.assign(b1 * mm + (1 - b1) * g)
            vv.assign(b2 * vv + (1 - b2) * tf.square(g))
            shape = [-1] + [1] * (len(p.shape) - 1)
            p.assign_sub(tf.reshape(lr_t * corr, shape) * mm / (tf.sqrt(vv) + eps))

    @tf.function(jit_compile=True, autograph=False)   # an explicit loop: no source needed at trace time
    def train_all(order):
        def body(t):
            step(order[t], t)
            return (t + 1,)
        tf.while_loop(lambda t: t < tf.shape(order)[0], body, (tf.constant(0),))

    train_all(tf.constant(order))

    # scores: each head on its held-out fold's images themselves (view 0)
    clean = np.flatnonzero(rows.view == 0)
    probs = []
    for s in range(0, len(clean), 2048):
        probs.append(forward(tf.constant(rows.x[clean[s:s + 2048]]), False).numpy())
    pred = np.concatenate(probs, axis=1).argmax(-1)          # [G, n_clean]
    correct = pred == rows.y[clean][None]
    held = fold_row[clean][None] == np.array([f for _, f in heads])[:, None]
    scores = []
    for i, o in enumerate(options):
        sel = slice(i * folds, (i + 1) * folds)
        c, n = int((correct[sel] & held[sel]).sum()), int(held[sel].sum())
        scores.append({"policy": o[0], "label_smoothing": float(o[1]), "lr_head": float(o[2]),
                       "correct": c, "n": n, "accuracy": round(c / max(1, n), 4)})
    best = max(range(len(options)), key=lambda i: (scores[i]["correct"], -i))
    o = options[best]
    return Choice(o[0], float(o[1]), float(o[2]), scores, round(time.time() - t0, 2), folds, n_img)
