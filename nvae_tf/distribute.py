"""Where a run executes: the distribution strategy, the chief, per-replica noise and replica-wide BatchNorm.

One device, all local GPUs (MirroredStrategy), several machines (MultiWorkerMirroredStrategy when TF_CONFIG or
Slurm names a cluster), or `--cpu_replicas=N` logical CPU devices. The model itself knows nothing of replicas:
`prepare_model` gives its BatchNorm layers their training-mode computation: statistics over the global batch
with several replicas, one fused op on one.
"""

import contextlib
import json
import os

import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.python.eager import record

from nvae_tf.model import ops as model_ops
from nvae_tf.model.distributions import KerasNoise


def split_cpu(num):
    """Split the CPU into `num` logical devices; must run before TensorFlow initialises its devices."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * num)


LIGHT_GRAPPLER_OFF = ("layout_optimizer", "function_optimization", "loop_optimization", "implementation_selector")


def tune_graph_optimizer():
    """Lighten TensorFlow's graph optimisation (Grappler) on a machine without GPUs, where every start of a run,
    `evaluate`, `sample` or `export` pays for it. Measured by benchmarks/startup.py on 2 cores (README), with
    the steady step no slower:
      - the MLIR hook off (`disable_tfg_optimizer`: TensorFlow runs no pass in it, yet converting every function
        to MLIR and back took a quarter of the optimisation time);
      - one round of the optimisers instead of two;
      - off, the passes that change nothing on a CPU graph of ours yet cost time (folder64 step, batch 16):
        the memory optimiser (6.7 s; its rewrites of the step raised the first step's peak by 1.1 GB), the
        layout optimiser (1.6 s, for GPU data layouts), the function optimiser (1.1 s; function calls are
        inlined before Grappler runs), the loop optimiser (0.3 s) and the implementation selector (0.2 s).
    Constant folding stays on: without it the first step of folder64 at batch 16 peaked 1.4 GB higher.
    These fields belong to the RewriterConfig, most of which `tf.config.optimizer` does not expose; they are set
    in the calling thread's function-call options (the thread that runs the steps), and left at TensorFlow's
    defaults if that API is not there. On GPUs, where nothing was measured, everything stays as it is."""
    if tf.config.list_physical_devices("GPU"):
        return False
    try:
        from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
        from tensorflow.python.eager import context
        ctx = context.context()
        config = config_pb2.ConfigProto()
        config.ParseFromString(ctx.function_call_options.config_proto_serialized)
        rewrite = config.graph_options.rewrite_options
        rewriter = rewriter_config_pb2.RewriterConfig
        rewrite.disable_tfg_optimizer = True
        rewrite.meta_optimizer_iterations = rewriter.ONE
        rewrite.memory_optimization = rewriter.NO_MEM_OPT
        for toggle in LIGHT_GRAPPLER_OFF:
            setattr(rewrite, toggle, rewriter.OFF)
        ctx.function_call_options = context.FunctionCallOptions(config_proto=config)
    except (ImportError, AttributeError, ValueError) as e:
        logging.debug("graph optimiser left at its defaults: %s", e)
        return False
    return True


def make_strategy(cpu_replicas=0):
    """MultiWorkerMirrored with a TF_CONFIG or Slurm cluster, Mirrored over several GPUs or CPU replicas, else the
    default strategy."""
    tune_graph_optimizer()
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    workers = sum(len(v) for k, v in tf_config.get("cluster", {}).items() if k in ("worker", "chief"))
    if workers > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    slurm_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or 1)
    if not tf_config and "SLURM_JOB_ID" in os.environ and slurm_tasks > 1:
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if cpu_replicas > 1:
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    return tf.distribute.get_strategy()


def is_chief(strategy):
    """Whether this process writes the run's files: the chief task, else worker 0; outside a cluster, always."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and
                                     "chief" not in resolver.cluster_spec().as_dict())


def describe(strategy):
    """The strategy as a user knows it, with its replicas: "MultiWorkerMirroredStrategy with 4 replicas"."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        name = "MultiWorkerMirroredStrategy"
    elif isinstance(strategy, tf.distribute.MirroredStrategy):
        name = "MirroredStrategy"
    else:
        return "one device"
    replicas = strategy.num_replicas_in_sync
    return f"{name} with {replicas} replica{'s' if replicas > 1 else ''}"


@tf.custom_gradient
def lean_swish(x):
    """x * sigmoid(x) with TensorFlow's own gradient (`tf.nn.silu`'s, the same values) in about half the graph
    ops: no multiplication by beta = 1 and no gradient for it. As there, only `x` is kept for the backward pass
    (the sigmoid is computed again once the incoming gradient exists)."""
    def grad(dy):
        with tf.control_dependencies([dy]):
            s = tf.sigmoid(x)
        return dy * (s * (1.0 + x * (1.0 - s)))
    return x * tf.sigmoid(x), grad


def lean_remat(f):
    """`f(*inputs)` (tensors in, one out) with its activations recomputed during back-propagation: the gradient
    checkpointing of `tf.recompute_grad`, without its cost in a traced graph. There, the recomputation is itself
    a custom gradient, and tracing it walks the graph backwards from its gradients to find the variables it
    reads, through everything computed before the checkpoint: a walk per rematerialised cell, each as long as
    the graph, 171 of the 275 s that CelebA-HQ's training step took to trace. Here the recomputation is a
    plain gradient tape. It starts only once the incoming gradient exists (a control dependency on every op it
    creates, variable reads included), so no recomputed activation or kernel is alive before it is needed."""
    @tf.custom_gradient
    def rematerialised(*inputs):
        with record.stop_recording():  # the outer tape needs the output alone; the gradient recomputes the rest
            y = f(*inputs)

        def grad(dy, variables=None):
            variables = list(variables or [])
            with tf.control_dependencies([dy]):
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    again = [tf.identity(t) for t in inputs]
                    tape.watch(again + variables)
                    y_again = f(*again)
            grads = tape.gradient(y_again, again + variables, output_gradients=dy,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return grads[:len(inputs)], grads[len(inputs):]

        return y, grad

    return rematerialised


def after_dependency(x, dependency):
    """`x` through an identity with a control dependency on `dependency`."""
    with tf.control_dependencies([dependency]):
        return tf.identity(x)


def prepare_model(model, strategy=None):
    """Make a built model ready for training under `strategy`: BatchNorm statistics over the global batch with
    several replicas, one fused BatchNorm op per layer with one; `lean_swish` for swish, `lean_remat` for
    gradient checkpointing, a control dependency for `model.ops.after`."""
    model_ops.set_swish(lean_swish)
    model_ops.set_remat(lean_remat)
    model_ops.set_after(after_dependency)
    replicated = (strategy or tf.distribute.get_strategy()).num_replicas_in_sync > 1
    for bn in model.batchnorm_layers:
        if replicated:
            bn.moments_fn = synchronized_moments
        else:
            bn.training_fn = fused_batch_norm
    return model


def fused_batch_norm(layer, inputs, update_statistics=True, with_swish=False, conv=None):
    """Training-mode BatchNorm of `layer` as one fused op (and one for its gradient) instead of some forty:
    normalisation with the batch's mean and biased variance, then running <- m running + (1 - m) batch, the
    biased variance as Keras's BatchNormalization takes it. With `with_swish`, swish of the result, and with
    `conv` (a `Conv2D` layer) that convolution of it, whose gradient keeps only the input (`_batch_norm_swish`)."""
    x = tf.cast(inputs, tf.float32)
    gamma, beta = tf.convert_to_tensor(layer.gamma), tf.convert_to_tensor(layer.beta)
    if with_swish:
        convolution = None if conv is None else _Convolution(conv, layer.compute_dtype)
        y, mean, variance = _batch_norm_swish(x, gamma, beta, layer.epsilon, layer.compute_dtype, convolution)
        y = y if conv is None else conv.add_bias(y)
    else:
        y, mean, variance, _ = _batch_norm_training(x, gamma, beta, layer.epsilon)
        y = tf.cast(y, layer.compute_dtype)
        y = y if conv is None else conv(y)
    if update_statistics:
        _update_statistic(layer.moving_mean, mean, layer.momentum)
        _update_statistic(layer.moving_variance, variance, layer.momentum)
    return y


def _batch_norm_training(x, gamma, beta, epsilon):
    """(normalised x, batch mean, biased batch variance, the op's reserved outputs for its gradient): TensorFlow's
    fused training-mode BatchNorm."""
    empty = tf.constant([], tf.float32)
    y, mean, variance, *reserved = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=epsilon, exponential_avg_factor=1.0,
        data_format="NHWC", is_training=True)
    # The op returns the unbiased variance. The count is a number of the graph when the shape is known (about ten
    # fewer ops per layer), the same float32 quotient either way.
    if x.shape[:-1].is_fully_defined():
        count = x.shape[:-1].num_elements()
        unbias = tf.constant(np.float32(count - 1) / np.float32(count), tf.float32)
    else:
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
        unbias = (count - 1.0) / count
    return y, mean, variance * unbias, reserved


class _Convolution:
    """The convolution of a `Conv2D` layer (without its bias) as TensorFlow ops, the forward op and the two ops
    of its gradient: the same ops, strides and padding as the layer's own call and TensorFlow's gradient of it."""

    def __init__(self, conv, dtype):
        self.kernel = tf.cast(conv.effective_kernel(), dtype)
        self.strides = [1, conv.strides, conv.strides, 1]
        self.pad, padding = conv.padding()
        self.padding = padding.upper()
        self.depthwise = conv.depthwise

    def _padded(self, z):
        p = self.pad
        return tf.pad(z, [[0, 0], [p, p], [p, p], [0, 0]]) if p else z

    def __call__(self, z, kernel):
        op = tf.raw_ops.DepthwiseConv2dNative if self.depthwise else tf.raw_ops.Conv2D
        return op(input=self._padded(z), filter=kernel, strides=self.strides, padding=self.padding)

    def gradients(self, z, kernel, d_out):
        """(d z, d kernel) for the output gradient `d_out`."""
        z = self._padded(z)
        if self.depthwise:
            backprop_input = tf.raw_ops.DepthwiseConv2dNativeBackpropInput
            backprop_filter = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter
        else:
            backprop_input, backprop_filter = tf.raw_ops.Conv2DBackpropInput, tf.raw_ops.Conv2DBackpropFilter
        d_z = backprop_input(input_sizes=tf.shape(z), filter=kernel, out_backprop=d_out, strides=self.strides,
                             padding=self.padding)
        d_kernel = backprop_filter(input=z, filter_sizes=tf.shape(kernel), out_backprop=d_out,
                                   strides=self.strides, padding=self.padding)
        p = self.pad
        return (d_z[:, p:-p, p:-p, :] if p else d_z), d_kernel


def _batch_norm_swish(x, gamma, beta, epsilon, dtype, conv=None):
    """(swish of the normalised x cast to `dtype`, then the convolution `conv` of it if given; batch mean, biased
    batch variance), whose gradient keeps only x, per-channel vectors and the kernel. The gradients of swish and
    of the convolution's kernel need the normalised tensor and swish of it: they are computed again from x, the
    batch statistics and the BatchNorm's parameters (one multiply-add and a swish per element) once the incoming
    gradient exists, instead of being held from the forward pass to the gradient, one or two tensors of the
    input's size per call. The BatchNorm's gradient is its fused gradient op, given the forward op's reserved
    outputs as TensorFlow's own gradient gives them. The values are those of the ops in sequence; the gradients
    agree with theirs to float32 rounding (the normalised tensor recomputed by another order of operations)."""
    kernels = [] if conv is None else [conv.kernel]

    @tf.custom_gradient
    def forward(x, gamma, beta, *kernel):
        y, mean, variance, reserved = _batch_norm_training(x, gamma, beta, epsilon)
        y = tf.cast(y, dtype)
        z = y * tf.sigmoid(y)

        def grad(d_out, *_):  # the batch statistics feed the running statistics only, not the loss
            with tf.control_dependencies([d_out]):
                scale = gamma * tf.math.rsqrt(variance + epsilon)
                y_again = tf.cast(x * scale + (beta - mean * scale), dtype)
            s = tf.sigmoid(y_again)
            d_kernel = []
            if conv is not None:
                d_out, d_k = conv.gradients(y_again * s, kernel[0], d_out)
                d_kernel = [d_k]
            d_y = tf.cast(d_out * (s * (1.0 + y_again * (1.0 - s))), tf.float32)
            d_x, d_gamma, d_beta, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=d_y, x=x, scale=gamma, reserve_space_1=reserved[0], reserve_space_2=reserved[1],
                reserve_space_3=reserved[2], epsilon=epsilon, data_format="NHWC", is_training=True)
            return (d_x, d_gamma, d_beta, *d_kernel)

        return (z if conv is None else conv(z, kernel[0]), mean, variance), grad

    return forward(x, gamma, beta, *kernels)


# While a training step is traced (`deferred_statistics`): {id(variable): (variable, momentum, [batch values])}
# of the running statistics `fused_batch_norm` computed and left unassigned.
_deferred = None


@contextlib.contextmanager
def deferred_statistics():
    """Within it, `fused_batch_norm` leaves the running statistics as they are and only records the batch's
    statistics; the `DeferredStatistics` this yields then computes the new values of every statistic with those of
    the same shape together (a handful of ops per shape instead of some ten per layer), for the caller to assign,
    e.g. only if the step is applied, without a copy of every statistic taken beforehand."""
    global _deferred
    outer, _deferred = _deferred, {}
    statistics = DeferredStatistics(_deferred)
    try:
        yield statistics
    finally:
        _deferred = outer


class DeferredStatistics:
    """The running statistics recorded within one `deferred_statistics` context."""

    def __init__(self, entries):
        self._entries = entries

    def groups(self):
        """`[(variables, before, after)]`: the recorded statistics grouped by shape, dtype, momentum and number of
        updates; `before` stacks their values now, `after` their new values (running <- m running + (1 - m)
        batch, once per recorded batch, in order: the same arithmetic as an immediate update)."""
        by_kind = {}
        for variable, momentum, batches in self._entries.values():
            key = (tuple(variable.shape), str(variable.dtype), momentum, len(batches))
            by_kind.setdefault(key, []).append((variable, batches))
        out = []
        for (_, _, momentum, updates), members in by_kind.items():
            variables = [variable for variable, _ in members]
            before = tf.stack([tf.convert_to_tensor(variable) for variable in variables])
            after = before
            for k in range(updates):
                after = after * momentum + tf.stack([batches[k] for _, batches in members]) * (1.0 - momentum)
            out.append((variables, before, after))
        return out


def _update_statistic(variable, batch, momentum):
    """running <- momentum running + (1 - momentum) batch, now or deferred (`deferred_statistics`)."""
    if _deferred is None:
        variable.assign(variable * momentum + batch * (1.0 - momentum))
    else:
        _deferred.setdefault(id(variable), (variable, momentum, []))[2].append(batch)


def synchronized_moments(x, axes):
    """The mean and variance of `x` over `axes` and over every replica's batch, computed as Keras's synchronised
    BatchNorm computes them (E[x^2] - E[x]^2, floored at 0; the same values), with one all-reduce of the packed
    sums instead of three, none on one replica, and no tensor of ones the size of `x` for the count."""
    dtype = x.dtype
    x = tf.cast(x, tf.float32)
    total = tf.reduce_sum(x, axis=axes, keepdims=True)
    squares = tf.reduce_sum(tf.square(x), axis=axes, keepdims=True)
    count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float32)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        packed = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.concat(
            [tf.reshape(total, [-1]), tf.reshape(squares, [-1]), count[None]], axis=0))
        total, squares = (tf.reshape(part, total.shape) for part in tf.split(packed[:-1], 2))
        count = packed[-1]
    mean = tf.math.divide_no_nan(total, count)
    variance = tf.maximum(tf.math.divide_no_nan(squares, count) - tf.square(mean), 0.0)
    mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
    return tf.cast(mean, dtype), tf.cast(variance, dtype)


class ReplicaNoise:
    """Each replica draws the noise of the whole global batch and keeps its own slice, so the posterior samples
    of N replicas are those of one replica with the global batch (and no two replicas share noise)."""

    def __init__(self, noise, replica_id, num_replicas):
        self.noise, self.replica_id, self.num_replicas = noise, replica_id, num_replicas

    def _slice(self, draw, shape, dtype):
        if self.num_replicas == 1:
            return draw(shape, dtype)
        batch = shape[0]
        full = draw((batch * self.num_replicas, *shape[1:]), dtype)
        return full[batch * self.replica_id:batch * (self.replica_id + 1)]

    def normal(self, shape, dtype="float32"):
        return self._slice(self.noise.normal, shape, dtype)

    def uniform(self, shape, dtype="float32"):
        return self._slice(self.noise.uniform, shape, dtype)


def replica_noise(seed_generator):
    """The noise source of the current replica, drawn from `seed_generator` (a `keras.random.SeedGenerator`)."""
    context = tf.distribute.get_replica_context()
    return ReplicaNoise(KerasNoise(seed_generator), context.replica_id_in_sync_group, context.num_replicas_in_sync)


def total(strategy, *values):
    """The sums over every replica of per-replica scalars (`strategy.run` results)."""
    return tuple(strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in values)
