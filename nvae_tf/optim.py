"""NVAE's optimiser and learning-rate schedule.

`NVAEAdamax` is Adamax as NVAE uses it: eps inside the max, u <- max(beta2 u, |g| + eps), and coupled L2
weight decay added to the gradient of every parameter. Keras's own Adamax divides by (u + eps) instead.

`NVAELearningRate`: linear warm-up from exactly 0 over `warmup_epochs`, then cosine annealing to
`learning_rate_min` stepped once per epoch (CosineAnnealingLR with T_max = epochs - warmup_epochs - 1).
"""

import math

import keras
import tensorflow as tf


# Elements of one slot buffer at most: a bound on the temporaries of one fused update.
BUCKET_ELEMENTS = 1 << 22


class NVAEAdamax(keras.optimizers.Optimizer):
    """Adamax with eps inside the max and coupled L2 weight decay.

        g <- g + l2 * p;  m <- b1 m + (1 - b1) g;  u <- max(b2 u, |g| + eps);  p <- p - lr / (1 - b1^t) * m / u

    Variables of the same shape are updated together: their parameters, gradients and slots are stacked
    (`m` and `u` are kept stacked, one `[n, *shape]` buffer per bucket of at most `BUCKET_ELEMENTS` elements),
    so a model of a thousand variables costs two ops per variable (a read and an assignment) plus a dozen per
    bucket, instead of a chain of a dozen per variable. The arithmetic is the same, element by element.
    """

    def __init__(self, learning_rate=1e-2, beta_1=0.9, beta_2=0.999, epsilon=1e-3, l2=3e-4, name="nvae_adamax",
                 **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1, self.beta_2, self.epsilon, self.l2 = beta_1, beta_2, epsilon, l2

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self.buckets = buckets([tuple(v.shape) for v in var_list], BUCKET_ELEMENTS)
        self._m, self._u = [], []
        for b, members in enumerate(self.buckets):
            shape = (len(members), *var_list[members[0]].shape)
            self._m.append(self.add_variable(shape, initializer="zeros", name=f"m_{b}"))
            self._u.append(self.add_variable(shape, initializer="zeros", name=f"u_{b}"))

    def apply(self, grads, trainable_variables=None):
        """Update the variables the optimiser was built with by `grads` (one per variable, in order)."""
        if trainable_variables is not None and not self.built:
            self.build(list(trainable_variables))
        self.apply_stacked(self.stack_gradients(grads))

    def stack_gradients(self, grads):
        """`grads` (one per variable, in order) stacked as the slots are: one `[n, *shape]` float32 tensor per
        bucket."""
        grads = list(grads)
        n = len(self._trainable_variables)
        if len(grads) != n or any(g is None for g in grads):
            raise ValueError(f"NVAEAdamax needs one gradient for each of its {n} variables, "
                             f"got {len(grads)} ({sum(g is None for g in grads)} None)")
        return [tf.stack([tf.cast(grads[i], tf.float32) for i in members]) for members in self.buckets]

    def apply_stacked(self, stacked_grads, gate=None):
        """One update by the stacked gradients of `stack_gradients`. With a scalar boolean `gate`, the update is
        taken where it is true; where it is false every variable, slot and the iteration count keep their
        values (the new ones are computed and discarded, so a non-finite gradient changes nothing)."""
        variables = self._trainable_variables
        with tf.name_scope(self.name):
            f32 = tf.float32
            learning_rate = tf.cast(self._get_current_learning_rate(), f32)
            t = tf.cast(self.iterations + 1, f32)
            step_size = learning_rate / (1.0 - tf.pow(tf.constant(self.beta_1, f32), t))
            l2, beta_1, beta_2, epsilon = (tf.constant(c, f32) for c in (self.l2, self.beta_1, self.beta_2,
                                                                          self.epsilon))
            one_minus_beta_1 = tf.constant(1.0 - self.beta_1, f32)
            for members, m, u, g in zip(self.buckets, self._m, self._u, stacked_grads):
                p = tf.stack([tf.convert_to_tensor(variables[i]) for i in members])
                m_old, u_old = tf.convert_to_tensor(m), tf.convert_to_tensor(u)
                g = g + l2 * p
                m_new = beta_1 * m_old + one_minus_beta_1 * g
                u_new = tf.maximum(beta_2 * u_old, tf.abs(g) + epsilon)
                p_new = p - step_size * m_new / u_new
                if gate is not None:
                    m_new, u_new, p_new = (tf.where(gate, new, old) for new, old in
                                           ((m_new, m_old), (u_new, u_old), (p_new, p)))
                m.assign(m_new)
                u.assign(u_new)
                for i, value in zip(members, tf.unstack(p_new)):
                    variables[i].assign(value)
        self.iterations.assign_add(1 if gate is None else tf.cast(gate, self.iterations.dtype))

    def legacy_slots(self, reader):
        """The slots `(m, u)` of a checkpoint written before the slots were stacked (one `m` and one `u` per
        variable: `optimizer/_variables/1..n` and `n+1..2n`), read with `reader` (`tf.train.load_checkpoint`); None
        if the checkpoint's optimiser state is not in that layout."""
        shapes = reader.get_variable_to_shape_map()
        n = len(self._trainable_variables)
        keys = [f"optimizer/_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE" for i in range(1, 2 * n + 1)]
        expected = [list(v.shape) for v in self._trainable_variables] * 2
        if [list(shapes.get(k, [-1])) for k in keys] != expected:
            return None
        return [reader.get_tensor(k) for k in keys[:n]], [reader.get_tensor(k) for k in keys[n:]]

    def set_slots(self, m, u):
        """Set the slots from one `m` and one `u` array per variable (in the order of the variables)."""
        for members, m_var, u_var in zip(self.buckets, self._m, self._u):
            m_var.assign(tf.stack([m[i] for i in members]))
            u_var.assign(tf.stack([u[i] for i in members]))

    def get_config(self):
        config = super().get_config()
        config.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon, l2=self.l2)
        return config


def buckets(shapes, limit):
    """The indices of `shapes` grouped by shape (in order of first appearance), each group cut into runs of at
    most `limit` elements in all (one at least)."""
    by_shape = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(tuple(shape), []).append(i)
    runs = []
    for shape, members in by_shape.items():
        per_run = max(1, limit // max(math.prod(shape), 1))
        runs += [members[k:k + per_run] for k in range(0, len(members), per_run)]
    return runs


class NVAELearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step): `learning_rate * step / warmup_steps` during warm-up, then cosine per epoch to the minimum."""

    def __init__(self, learning_rate, learning_rate_min, steps_per_epoch, epochs, warmup_epochs):
        self.learning_rate, self.learning_rate_min = float(learning_rate), float(learning_rate_min)
        self.steps_per_epoch, self.epochs, self.warmup_epochs = int(steps_per_epoch), int(epochs), int(warmup_epochs)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup_steps = float(self.warmup_epochs * self.steps_per_epoch)
        epoch = tf.floor(step / self.steps_per_epoch)
        period = float(max(self.epochs - self.warmup_epochs - 1, 1))
        k = tf.maximum(epoch - self.warmup_epochs, 0.0)
        cosine = self.learning_rate_min + (self.learning_rate - self.learning_rate_min) * 0.5 * (
            1.0 + tf.cos(math.pi * k / period))
        if warmup_steps == 0:
            return cosine
        return tf.where(step < warmup_steps, self.learning_rate * step / warmup_steps, cosine)

    def get_config(self):
        return {"learning_rate": self.learning_rate, "learning_rate_min": self.learning_rate_min,
                "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs, "warmup_epochs": self.warmup_epochs}
