"""The data-dependent knobs of stage 1 chosen by measurement: k-fold cross-validation of the head
on the cached features.

What is chosen (each only where the user left it at auto): whether to augment at all and whether
the augmented views may be mirrored (policy photo, upright or none), label smoothing (0 or 0.1)
and the head's learning rate.
Folds are grouped by source image: every view of an image sits in the same fold, and a fold is
scored on its images themselves (view 0), never on their augmented views.

Every option x fold is one head in a batched TensorFlow program (kernels [G, in, out]): the head
stage 1 builds (edgeft.nn.model.build_head: Flatten or GAP, the hidden Dense with relu when
--dense is set, dropout, L2 on the kernels, softmax), trained as stage 1 trains it: Keras' Adam
update, the same epochs and batch size, warm-up then cosine, label smoothing, class weights. A
held-out fold's rows are masked out of its heads' loss. tests/test_choose.py trains the Keras head
itself on the same features, batches, initial weights and dropout masks and gets the same weights.
Heads whose optimizer state would not fit in memory together train in groups (`heads_per_group`).

The flip arms are compared at equal size: `upright` trains on view 0 and the views not mirrored,
`photo` on view 0 and a random half of all augmented views (mirrored or not), so neither has more
rows than the other; the final head of an `upright` choice trains on the unmirrored views only.
`none` trains on view 0 alone: whether augmented views help at all is the question it answers.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from edgeft.core.errors import UserError
from edgeft.data.cache import available_memory, size_text

LABEL_SMOOTHING_OPTIONS = (0.0, 0.1)
# --head auto: GAP (the prior: the smallest file) against Flatten, compared after the other knobs
# (edgeft.train.stage1.choose_settings). Full two-stage runs, 3 seeds (docs/training.md): Flatten
# +7.8 / +5.3 points on two folders, -0.1 / -1.3 on two others: no head is best everywhere.
HEAD_OPTIONS = ("gap", "flatten")
# the head's learning rates the choice compares, the prior first: measured on EfficientNet-Lite0
# (ImageNet) at 128 px on two real folders, 3 seeds, by tools/bench_stage1.py (docs/training.md): the
# best head at 3e-3 or 1e-2 on both, 1e-3 up to 3 points and 3e-4 up to 6 points below
LR_HEAD_OPTIONS = (3e-3, 1e-2)
FOLDS = 3
# One batched program holds every head's parameters, Adam's two moments, its gradient, the loop's
# next values and the inputs and outputs: measured 41 bytes a parameter (VGG16 at 224 px, Flatten ->
# Dense 256, 12 heads a group: peak RSS 4.5 GB against 1.25 GB before the choice). Heads train
# together up to GROUP_BYTES, in several programs beyond it; a program may use 40 % of the free RAM.
BYTES_PER_PARAM = 48
GROUP_BYTES = 2 << 30
FREE_SHARE = 0.4


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
    groups: int = 1
    right: np.ndarray | None = None   # [images] the chosen option right on each held-out image (paired tests)
    head: str | None = None           # the head the choice was made with (--head auto: chosen too)
    head_scores: dict | None = None   # --head auto: each head's held-out images right, and the test's p


@dataclass(frozen=True)
class HeadTraining:
    """How every head of the choice trains: stage 1's head and optimizer settings."""
    n_classes: int
    epochs: int
    batch: int
    dropout: float
    l2: float
    dense: int
    warmup: float
    schedule: str
    seed: int


def pool(f: np.ndarray, head: str) -> np.ndarray:
    """The head's first layer on backbone features [n, h, w, c]: Flatten or GlobalAveragePooling2D."""
    f = np.asarray(f, np.float32)
    return f.reshape(len(f), -1) if head == "flatten" else f.reshape(len(f), -1, f.shape[-1]).mean(1)


def head_dims(d: int, dense: int, n_classes: int) -> list[tuple[int, int]]:
    """(inputs, units) of the head's Dense layers: the hidden one when `dense`, then the output."""
    units = ([dense] if dense else []) + [n_classes]
    return list(zip([d] + units[:-1], units))


def heads_per_group(n_heads: int, d: int, dense: int, n_classes: int, rows: int, free: int | None) -> int:
    """How many heads one batched program trains, so that it fits in memory; a one-line UserError,
    before anything is allocated, when not even one head fits beside the rows."""
    per_head = BYTES_PER_PARAM * sum(a * b + b for a, b in head_dims(d, dense, n_classes))
    fixed = 4 * rows * d
    budget = GROUP_BYTES if free is None else min(GROUP_BYTES, FREE_SHARE * free - fixed)
    if free is not None and fixed + per_head > FREE_SHARE * free:
        raise UserError(f"choosing stage 1's settings needs about {size_text(fixed + per_head)} for one head "
                        f"({d} features -> {f'{dense} -> ' if dense else ''}{n_classes}) and its {rows} rows, but "
                        f"only {size_text(free)} of memory is free: give --augment-policy, --label-smoothing and "
                        f"--lr-head (nothing to choose), or a smaller head (--head gap, a smaller --dense)")
    fit = max(1, int(budget // per_head))
    groups = math.ceil(n_heads / min(n_heads, fit))
    return math.ceil(n_heads / groups)   # equal groups: one traced shape for all but maybe the last


def init_head(dims: list[tuple[int, int]], seed: int, index: int) -> list[np.ndarray]:
    """Head `index`'s initial kernels (Keras' glorot_uniform) then biases (zeros), its own stream."""
    rng = np.random.default_rng([seed, 77, index])
    kernels = [rng.uniform(-np.sqrt(6.0 / (a + b)), np.sqrt(6.0 / (a + b)), (a, b)).astype(np.float32)
               for a, b in dims]
    return kernels + [np.zeros(b, np.float32) for _, b in dims]


def batch_order(rows: int, epochs: int, batch: int, seed: int) -> np.ndarray:
    """[steps, batch] row indices shared by every head: a permutation per epoch; the last batch of
    an epoch is padded with `rows` (an all-zero row no head counts)."""
    rng = np.random.default_rng([seed, 77])
    per_epoch = -(-rows // batch)
    order = np.full((epochs, per_epoch * batch), rows, np.int64)
    for e in range(epochs):
        order[e, :rows] = rng.permutation(rows)
    return order.reshape(epochs * per_epoch, batch)


def dropout_keep(shape, rate: float, seed: int, step):
    """The dropout mask of a training step, scaled as tf.nn.dropout scales (kept / (1 - rate)).
    Stateless: the same for a head whichever group it trains in, and reproducible by the test."""
    from edgeft._keras import tf

    # threefry, not the default philox: under XLA on CPU the choice on 62,720 Flatten features took 49 s
    # with philox masks, 11 s with threefry (tools/bench_choice_speed.py, docs/benchmarks.md)
    u = tf.random.stateless_uniform(shape, seed=tf.stack([tf.constant(seed, tf.int32), tf.cast(step, tf.int32)]),
                                    alg="threefry")
    return tf.cast(u >= rate, tf.float32) / (1.0 - rate)


def lr_at(t, lr, warm: int, total: int, schedule: str):
    """stage 1's schedule at step t (edgeft.train.recipe.lr_schedule: Keras' CosineDecay with warm-up)."""
    from edgeft._keras import tf

    frac = tf.clip_by_value((t - warm) / max(1, total - warm), 0.0, 1.0)
    after = 0.5 * (1 + tf.cos(np.pi * frac)) if schedule == "cosine" else 1.0
    return lr * tf.where(t < warm, t / max(1, warm), after)


def train_heads(x: np.ndarray, y: np.ndarray, masks: np.ndarray, row_w: np.ndarray, ls: np.ndarray,
                lr: np.ndarray, h: HeadTraining, per_group: int | None = None):
    """Trains G heads on rows `x` [R, D] (head g on the rows where masks[g] is set), `per_group` at a
    time; yields (first head, last head + 1, [kernels..., biases...] each [g, ...]) per group.
    Groups of one size share one compiled program."""
    from edgeft._keras import tf

    G, R, D = len(masks), len(y), x.shape[1]
    dims = head_dims(D, h.dense, h.n_classes)
    order = batch_order(R, h.epochs, h.batch, h.seed)
    total = max(1, len(order))
    warm = int(h.warmup * total)
    # one extra all-zero row, masked out of every head: it pads the last batch of each epoch
    X = tf.constant(np.concatenate([x, np.zeros((1, D), np.float32)]), tf.float32)
    Y = tf.constant(np.concatenate([y, [0]]), tf.int32)
    W_ROW = tf.constant(np.concatenate([row_w, [0.0]]).astype(np.float32))
    ORDER = tf.constant(order)
    n = len(dims)

    def forward(xb, t, kernels, biases, lo):
        # the input is shared by every head ([B, D]); a hidden layer makes it per head ([g, B, H])
        if n == 1:
            if h.dropout:   # pool -> Dropout -> Dense: one mask for all heads (they differ in their options)
                xb = xb * dropout_keep(tf.shape(xb), h.dropout, h.seed, t)
            return tf.einsum("bd,gdc->gbc", xb, kernels[0]) + biases[0][:, None, :]
        z = tf.nn.relu(tf.einsum("bd,gdh->gbh", xb, kernels[0]) + biases[0][:, None, :])
        if h.dropout:   # pool -> Dense relu -> Dropout -> Dense: a mask per head (all G drawn, the group's kept)
            keep = dropout_keep([G, tf.shape(xb)[0], h.dense], h.dropout, h.seed, t)
            z = z * tf.slice(keep, [lo, 0, 0], tf.shape(z))
        return tf.einsum("gbh,ghc->gbc", z, kernels[1]) + biases[1][:, None, :]

    # the rows are passed as arguments rather than captured as constants of the compiled program
    # (measured: no change in time at 62,720 features; it keeps large rows out of the program itself)
    @tf.function(jit_compile=True, autograph=False)   # an explicit loop: no source needed at trace time
    def train_group(params, mask, LS, LR, lo, X, Y, W_ROW, ORDER):
        def step(t, params, m, v):
            idx = ORDER[t]
            xb, yb = tf.gather(X, idx), tf.gather(Y, idx)
            present = tf.gather(mask, idx, axis=1)
            onehot = tf.one_hot(yb, h.n_classes)[None]
            target = onehot * (1.0 - LS[:, None, None]) + LS[:, None, None] / h.n_classes
            with tf.GradientTape() as tape:
                tape.watch(params)
                kernels, biases = params[:n], params[n:]
                ce = -tf.reduce_sum(target * tf.nn.log_softmax(forward(xb, t, kernels, biases, lo)), axis=-1)
                # Keras' SUM_OVER_BATCH_SIZE: weighted sum over the head's own rows / their count
                count = tf.maximum(tf.reduce_sum(present, 1), 1.0)
                loss = tf.reduce_sum(ce * present * tf.gather(W_ROW, idx)[None], axis=1) / count
                if h.l2:
                    loss += h.l2 * sum(tf.reduce_sum(tf.square(k), axis=[1, 2]) for k in kernels)
                total_loss = tf.reduce_sum(loss)   # heads are independent: one sum, each its own gradient
            grads = tape.gradient(total_loss, params)
            tf_t = tf.cast(t, tf.float32)
            # Keras' Adam, written as tf_keras writes it (same rounding)
            b1, b2, eps = 0.9, 0.999, 1e-7
            alpha = lr_at(tf_t, LR, warm, total, h.schedule) * tf.sqrt(1 - b2 ** (tf_t + 1)) / (1 - b1 ** (tf_t + 1))
            new_p, new_m, new_v = [], [], []
            for p, g, mm, vv in zip(params, grads, m, v):
                mm = mm + (g - mm) * (1 - b1)
                vv = vv + (tf.square(g) - vv) * (1 - b2)
                shape = [-1] + [1] * (len(p.shape) - 1)
                new_p.append(p - (mm * tf.reshape(alpha, shape)) / (tf.sqrt(vv) + eps))
                new_m.append(mm)
                new_v.append(vv)
            return new_p, new_m, new_v

        def body(t, params, m, v):
            return (t + 1, *step(t, params, m, v))

        zeros = [tf.zeros_like(p) for p in params]
        return tf.while_loop(lambda t, *_: t < total, body, (tf.constant(0), list(params), zeros, list(zeros)))[1]

    per_group = per_group or G
    for lo in range(0, G, per_group):
        hi = min(G, lo + per_group)
        init = [init_head(dims, h.seed, i) for i in range(lo, hi)]
        params = [tf.constant(np.stack([p[k] for p in init])) for k in range(2 * n)]
        del init
        mask = tf.constant(np.concatenate([masks[lo:hi], np.zeros((hi - lo, 1), np.float32)], axis=1))
        out = train_group(params, mask, tf.constant(ls[lo:hi], tf.float32), tf.constant(lr[lo:hi], tf.float32),
                          tf.constant(lo), X, Y, W_ROW, ORDER)
        del params
        yield lo, hi, [p.numpy() for p in out]


def logits(params: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """[g, n, classes] from a group's params (kernels then biases) on rows x [n, D], inference."""
    n = len(params) // 2
    z = x[None]
    for i in range(n):
        z = np.matmul(z, params[i]) + params[n + i][:, None, :]
        if i < n - 1:
            z = np.maximum(z, 0.0)
    return z


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


@dataclass
class Plan:
    """The heads of a choice: options x folds, each head's training rows and settings."""
    options: list
    heads: list
    fold_row: np.ndarray
    masks: np.ndarray      # [G, R] float32: 1 where head g trains on row r
    row_w: np.ndarray      # [R] class weight of each row
    ls: np.ndarray         # [G] label smoothing
    lr: np.ndarray         # [G] learning rate
    n_images: int


def plan(rows: Rows, n_classes: int, arms: tuple, smoothings: tuple, lrs: tuple, class_weights, seed: int,
         folds: int = FOLDS) -> Plan:
    n_img = int(rows.image.max()) + 1
    y_img = np.zeros(n_img, np.int64)
    y_img[rows.image[rows.view == 0]] = rows.y[rows.view == 0]
    fold_row = folds_by_image(y_img, folds, seed)[rows.image]
    options = list(itertools.product(arms, smoothings, lrs))
    heads = [(o, f) for o in options for f in range(folds)]
    masks = np.stack([arm_mask(rows, o[0]) & (fold_row != f) for o, f in heads]).astype(np.float32)
    cw = np.ones(n_classes, np.float32) if class_weights is None else np.asarray(class_weights, np.float32)
    return Plan(options, heads, fold_row, masks, cw[rows.y], np.array([o[1] for o, _ in heads], np.float32),
                np.array([o[2] for o, _ in heads], np.float32), n_img)


PRIOR_ALPHA = 0.05   # an option replaces the prior only when it is better than that by a one-sided sign test


def sign_test(a: np.ndarray, b: np.ndarray) -> float:
    """One-sided exact sign (McNemar) test on paired right/wrong vectors: the chance of `a` being right
    where `b` is wrong at least this often among the images where they differ, were they equally good."""
    k, n = int(np.sum(a & ~b)), int(np.sum(a != b))
    if n == 0:
        return 1.0
    return float(sum(math.comb(n, j) for j in range(k, n + 1)) / 2 ** n)


def prior_unless_better(right: list[np.ndarray], correct: list[int]) -> int:
    """The option with the most correct images, unless it is not better than the prior (option 0:
    every list's documented default first) by the paired sign test at PRIOR_ALPHA: then the prior.
    A difference of a few images is fold noise, and the choice must not turn on one image."""
    best = max(range(len(correct)), key=lambda i: (correct[i], -i))
    if best != 0 and sign_test(right[best], right[0]) >= PRIOR_ALPHA:
        return 0
    return best


def choose(rows: Rows, n_classes: int, *, arms: tuple, smoothings: tuple, lrs: tuple, epochs: int, batch: int,
           dropout: float, l2: float, dense: int, warmup: float, schedule: str, class_weights: np.ndarray | None,
           seed: int, folds: int = FOLDS, free: int | None = -1) -> Choice:
    """The best (arm, label smoothing, learning rate) by cross-validated accuracy on the images
    themselves; ties go to the earlier option of each list (the defaults come first), and an option
    replaces the prior (the first of every list) only when a paired sign test over the images says it
    is better (`prior_unless_better`).
    `free`: bytes of memory the heads may plan on (-1: what the OS says is free now)."""
    t0 = time.time()
    p = plan(rows, n_classes, arms, smoothings, lrs, class_weights, seed, folds)
    h = HeadTraining(n_classes, epochs, batch, dropout, l2, dense, warmup, schedule, seed)
    free = available_memory() if free == -1 else free
    per_group = heads_per_group(len(p.heads), rows.x.shape[1], dense, n_classes, len(rows.y), free)
    # scores: each head on its held-out fold's images themselves (view 0)
    clean = np.flatnonzero(rows.view == 0)
    pred = np.zeros((len(p.heads), len(clean)), np.int64)
    for lo, hi, params in train_heads(rows.x, rows.y, p.masks, p.row_w, p.ls, p.lr, h, per_group):
        for s in range(0, len(clean), 2048):
            pred[lo:hi, s:s + 2048] = logits(params, rows.x[clean[s:s + 2048]]).argmax(-1)
    correct = pred == rows.y[clean][None]
    held = p.fold_row[clean][None] == np.array([f for _, f in p.heads])[:, None]
    scores = []
    for i, o in enumerate(p.options):
        sel = slice(i * folds, (i + 1) * folds)
        c, n = int((correct[sel] & held[sel]).sum()), int(held[sel].sum())
        scores.append({"policy": o[0], "label_smoothing": float(o[1]), "lr_head": float(o[2]),
                       "correct": c, "n": n, "accuracy": round(c / max(1, n), 4)})
    # per image (each is held out once per option): right or wrong, for the paired test
    right = [(correct[i * folds:(i + 1) * folds] & held[i * folds:(i + 1) * folds]).any(axis=0)
             for i in range(len(p.options))]
    best = prior_unless_better(right, [sc["correct"] for sc in scores])
    for i, sc in enumerate(scores):
        sc["p_vs_prior"] = round(sign_test(right[i], right[0]), 4) if i else None
    o = p.options[best]
    return Choice(o[0], float(o[1]), float(o[2]), scores, round(time.time() - t0, 2), folds, p.n_images,
                  -(-len(p.heads) // per_group), right[best])
