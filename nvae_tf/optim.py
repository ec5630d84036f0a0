"""NVAE's optimiser and learning-rate schedule.

`NVAEAdamax` is Adamax as NVAE uses it: eps inside the max, u <- max(beta2 u, |g| + eps), and coupled L2
weight decay added to the gradient of every parameter. Keras's own Adamax divides by (u + eps) instead.

`NVAELearningRate`: linear warm-up from exactly 0 over `warmup_epochs`, then cosine annealing to
`learning_rate_min` stepped once per epoch (CosineAnnealingLR with T_max = epochs - warmup_epochs - 1).
"""

import math

import keras
import tensorflow as tf


class NVAEAdamax(keras.optimizers.Optimizer):
    """Adamax with eps inside the max and coupled L2 weight decay.

        g <- g + l2 * p;  m <- b1 m + (1 - b1) g;  u <- max(b2 u, |g| + eps);  p <- p - lr / (1 - b1^t) * m / u
    """

    def __init__(self, learning_rate=1e-2, beta_1=0.9, beta_2=0.999, epsilon=1e-3, l2=3e-4, name="nvae_adamax",
                 **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1, self.beta_2, self.epsilon, self.l2 = beta_1, beta_2, epsilon, l2

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._m = [self.add_variable_from_reference(v, "m") for v in var_list]
        self._u = [self.add_variable_from_reference(v, "u") for v in var_list]

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = tf.cast(learning_rate, dtype)
        g = tf.cast(gradient, dtype) + tf.cast(self.l2, dtype) * variable
        t = tf.cast(self.iterations + 1, dtype)
        i = self._get_variable_index(variable)
        m, u = self._m[i], self._u[i]
        self.assign(m, self.beta_1 * m + (1.0 - self.beta_1) * g)
        self.assign(u, tf.maximum(self.beta_2 * u, tf.abs(g) + self.epsilon))
        self.assign_sub(variable, lr / (1.0 - tf.pow(tf.cast(self.beta_1, dtype), t)) * m / u)

    def get_config(self):
        config = super().get_config()
        config.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon, l2=self.l2)
        return config


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
