"""The deployed computations of a trained NVAE: counter-based noise that TFLite can run, request checks inside
the graph, the SavedModel signatures and the TFLite sampler (written by `python -m nvae_tf.export`).

Noise comes from `HashNoise`, a counter-based generator made of builtin integer ops (xor, multiply, floor
division and modulo), used by the SavedModel and the TFLite sampler alike, so a server and a phone give the
same images for the same seed and temperature.
"""

import math
import shutil
import struct

import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from nvae_tf.objective import bits_per_dim
from nvae_tf.sampling import MAX_TEMPERATURE, reconstruct

SEED_MODULUS = 2 ** 31 - 1
_MIX_1, _MIX_2 = 0x7FEB352D, 0x846CA68B - 2 ** 32  # multipliers of a 32-bit integer hash (as int32)
_STREAM = 0x2545F491
_MIN_TEMPERATURE_BITS = 0x00800000  # the bits of the smallest normal float32, 2^-126
_MAX_TEMPERATURE_BITS = struct.unpack("<i", struct.pack("<f", MAX_TEMPERATURE))[0]


# ------------------------------------------------------------------------------------------------- noise
def _shift_right(x, bits):
    """Logical right shift of int32 values (as unsigned 32-bit), with floor division and modulo only."""
    return tf.math.floormod(tf.math.floordiv(x, 2 ** bits), 2 ** (32 - bits))


def hash32(x):
    """A 32-bit integer hash (xor-shift-multiply) on int32 tensors, wrapping like unsigned arithmetic."""
    x = tf.bitwise.bitwise_xor(x, _shift_right(x, 16)) * _MIX_1
    x = tf.bitwise.bitwise_xor(x, _shift_right(x, 15)) * _MIX_2
    return tf.bitwise.bitwise_xor(x, _shift_right(x, 16))


class HashNoise:
    """Counter-based noise: draw i of a sampler gets stream key hash(key ^ i * c); element j of that draw gets
    hash(j ^ stream key). Uniforms take the top 24 bits, (bits + 0.5) / 2^24, in (0, 1); normals use Box-Muller
    on two uniforms. Only builtin TFLite ops, and identical bits in TensorFlow and TFLite.

    `seed` is an int64 scalar tensor; it is reduced modulo 2^31 - 1. Each `HashNoise` must be used for one
    traced computation: the draw counter is a Python integer advanced at trace time.
    """

    def __init__(self, seed):
        seed = tf.cast(tf.math.floormod(tf.cast(seed, tf.int64), SEED_MODULUS), tf.int32)
        self.key = hash32(hash32(seed) + 1)
        self.draws = 0

    def _bits(self, shape):
        self.draws += 1
        stream = hash32(tf.bitwise.bitwise_xor(self.key, self.draws * _STREAM))
        count = tf.reduce_prod(tf.cast(shape, tf.int32))
        return tf.reshape(hash32(tf.bitwise.bitwise_xor(tf.range(count, dtype=tf.int32), stream)), shape)

    def uniform(self, shape, dtype="float32"):
        u = (tf.cast(_shift_right(self._bits(shape), 8), tf.float32) + 0.5) * 2.0 ** -24
        return tf.cast(u, dtype)

    def normal(self, shape, dtype="float32"):
        u1, u2 = self.uniform(shape), self.uniform(shape)
        return tf.cast(tf.sqrt(-2.0 * tf.math.log(u1)) * tf.cos(2.0 * math.pi * u2), dtype)


def temperature_ok(temperature):
    """Boolean tensor, elementwise on float32 `temperature`: smallest normal float32 <= temperature <= 2, so
    zero, negatives, denormals, infinities and NaN are refused.

    The bounds are compared with the float's bits as int32 (for floats >= 0 the integer order is the float
    order, and negative floats are negative integers). Integer comparisons give the same answer everywhere,
    float ones do not: TensorFlow flushes denormals to zero and TFLite does not, and float16 quantisation of
    the TFLite sampler turns a float constant as small as the smallest normal float into 0.
    """
    bits = tf.bitcast(temperature, tf.int32)
    return tf.logical_and(bits >= _MIN_TEMPERATURE_BITS, bits <= _MAX_TEMPERATURE_BITS)


def _to_uint8(images):
    return tf.cast(tf.round(tf.clip_by_value(images, 0.0, 1.0) * 255.0), tf.uint8)


# ------------------------------------------------------------------------------------------- signatures
def _checked(rules):
    """The inputs of `rules`, a list of `(name, value, ok, requirement, got, shown, shape)`, once every check
    passed, in the order of `rules` and with the static shapes `shape` (None: any size).

    `ok` is a boolean scalar computed from `value` by ops that accept any shape; a failed check raises
    InvalidArgument "<name> must be <requirement>, <got>" followed by `shown` (the value or its shape). The checks
    run one after another, so a request with several bad inputs names the first of them, and every op that
    reads a returned value runs after all of them.
    """
    check = None
    for name, _, ok, requirement, got, shown, _ in rules:
        with tf.control_dependencies([check] if check is not None else []):
            check = tf.debugging.Assert(ok, [f"{name} must be {requirement}, {got}", shown], summarize=8,
                                        name=f"check_{name}")
    with tf.control_dependencies([check]):
        # A reshape, not tf.ensure_shape: Grappler's shape inference carries the shape that ensure_shape asserts
        # back to its input, constant-folds tf.rank(value) in `ok`, and the check passes a tensor of the wrong
        # rank on.
        return [tf.reshape(value, [-1 if d is None else d for d in shape]) for _, value, *_, shape in rules]


class Signatures:
    """The exported computations of one model.

    Every SavedModel input is declared with an unknown shape: TF Serving feeds tensors into the graph without
    comparing them with the declared shapes, so the checks inside the graph are what guards the model, and
    they must not rest on shapes the graph was told to assume.
    """

    def __init__(self, model, max_samples=64, pixels="sample"):
        self.model, self.config = model, model.config
        self.max_samples, self.pixels = int(max_samples), pixels
        self.image_shape = tuple(self.config.image_shape)

    def inputs(self):
        """{signature: {input: (dtype name, shape, requirement)}}: what each input must be. `shape` is the
        checked shape (None for the image batch), `requirement` the text of the error when a check fails."""
        m, (h, w, c) = self.max_samples, self.image_shape
        images = {"images": ("uint8", [None, h, w, c], f"[1..{m}, {h}, {w}, {c}] uint8")}
        return {
            "serving_default": {"num_samples": ("int32", [], f"an int32 scalar in [1, {m}]"),
                                "temperature": ("float32", [], f"a float32 scalar in (0, {MAX_TEMPERATURE:g}]"),
                                "seed": ("int64", [], "an int64 scalar")},
            "reconstruct": images,
            "nelbo": images,
        }

    def specs(self):
        """{signature: [tf.TensorSpec]}: the declared inputs, dtypes only (shapes unknown)."""
        return {signature: [tf.TensorSpec(None, tf.as_dtype(dtype), name=name)
                            for name, (dtype, _, _) in inputs.items()]
                for signature, inputs in self.inputs().items()}

    def _scalar_rule(self, name, value, in_range=None):
        _, shape, requirement = self.inputs()["serving_default"][name]
        ok = tf.equal(tf.rank(value), 0)
        if in_range is not None:  # elementwise, so that it runs on a value of any shape
            ok = tf.logical_and(ok, tf.reduce_all(in_range))
        return name, value, ok, requirement, "got", value, shape

    def _image_rule(self, images):
        _, shape, requirement = self.inputs()["nelbo"]["images"]
        # The first four sizes, zero-padded, can be compared with [1..max, H, W, C] whatever the rank is.
        sizes = tf.shape(images)
        first4 = tf.concat([sizes, tf.zeros([4], tf.int32)], 0)[:4]
        ok = tf.reduce_all([tf.equal(tf.rank(images), 4), first4[0] >= 1, first4[0] <= self.max_samples,
                            tf.reduce_all(tf.equal(first4[1:], self.image_shape))])
        return "images", images, ok, requirement, "got shape", sizes, shape

    def sample_pixels(self, num_samples, temperature, seed):
        """float32 `[num_samples, H, W, C]` in [0, 1]; no validation (the TFLite sampler calls this directly)."""
        return self.model.sample(num_samples, temperature, noise=HashNoise(seed), mode=self.pixels)

    def serving_default(self, num_samples, temperature, seed):
        """{"images": uint8 `[num_samples, H, W, C]`} drawn at `temperature` with the noise of `seed`."""
        rules = [self._scalar_rule("num_samples", num_samples,
                                   tf.logical_and(num_samples >= 1, num_samples <= self.max_samples)),
                 self._scalar_rule("temperature", temperature, temperature_ok(temperature)),
                 self._scalar_rule("seed", seed)]
        return {"images": _to_uint8(self.sample_pixels(*_checked(rules)))}

    def reconstruct(self, images):
        """{"images": uint8 `[batch, H, W, C]`}: each of `images` decoded from one posterior sample."""
        images, = _checked([self._image_rule(images)])
        noise = HashNoise(tf.constant(0, tf.int64))
        _, pixels = reconstruct(self.model, images, noise, self.pixels)
        return {"images": _to_uint8(pixels)}

    def nelbo(self, images):
        """{"bpd": float32 `[batch]`}: the negative ELBO of each of `images` in bits per dimension."""
        images, = _checked([self._image_rule(images)])
        out = self.model(images, training=False, noise=HashNoise(tf.constant(0, tf.int64)))
        return {"bpd": tf.cast(bits_per_dim(out.negative_elbo(), self.config.data_dims), tf.float32)}


def save_functions(model, path, functions):
    """A SavedModel at `path` whose signatures are `functions` ({name: (python function, input specs)}).

    The SavedModel tracks the model's underlying `tf.Variable`s directly: Keras's ExportArchive (Keras 3.15)
    saves every weight twice, once per Keras variable and once per captured `tf.Variable`, doubling the
    SavedModel on disk and in the server's memory. Returns {name: concrete function}.
    """
    module = tf.Module()
    # The backing tf.Variables, in a dict: TensorFlow's save walks a list of variables with `list.index`, which
    # compares variables with `==` (an op each): quadratic in their number, 10 s of a digits export.
    module.model_variables = {f"{i:05d}": v.value for i, v in enumerate(model.variables)}
    # The functions are saved as signatures only, not also as attributes of the module: the writer traces an
    # attribute's function again (in its own saving context), which took a fifth of a digits export.
    concrete = {name: tf.function(fn, input_signature=spec, autograph=False).get_concrete_function()
                for name, (fn, spec) in functions.items()}
    # No gradient functions: a sampler is not differentiated, and tracing them took a third of the save.
    tf.saved_model.save(module, path, signatures=concrete,
                        options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
    return concrete


def export_saved_model(model, path, max_samples=64, pixels="sample"):
    """Write the SavedModel with the three signatures to `path`."""
    signatures = Signatures(model, max_samples, pixels)
    save_functions(model, path, {name: (getattr(signatures, name), spec)
                                 for name, spec in signatures.specs().items()})
    return signatures


# Sampler weights (elements) up to which the TFLite converter is given them frozen into the graph; a larger
# sampler is given as variables (a frozen graph is one protocol buffer, at most 2 GiB).
FROZEN_SAMPLER_LIMIT = 1 << 28


def export_tflite(model, path, batch=1, pixels="sample", quantize="none", scratch=None):
    """Write the TFLite sampler, converted with builtin ops only. Returns the number of sampler weights.

    Inputs `temperature` float32 and `seed` int64 (scalars); outputs `images` uint8 `[batch, H, W, C]` and
    `valid` int32 scalar. A temperature in (0, 2] gives valid = 1 and the SavedModel's images for that seed and
    temperature; any other temperature (NaN, infinities and denormals included) gives valid = 0 and all-zero
    images.
    """
    signatures = Signatures(model, batch, pixels)

    def sampler(temperature, seed):
        # tf.debugging asserts are not TFLite builtins: a refused temperature is reported in an output instead.
        valid = temperature_ok(temperature)
        pixels = signatures.sample_pixels(batch, temperature, seed)
        # Selected before the uint8 cast: TFLite's SELECT_V2 takes no uint8 (and NaN pixels never reach a cast).
        return {"images": _to_uint8(tf.where(valid, pixels, 0.0)), "valid": tf.cast(valid, tf.int32)}

    spec = [tf.TensorSpec([], tf.float32, name="temperature"), tf.TensorSpec([], tf.int64, name="seed")]
    scratch = scratch or path + ".savedmodel.tmp"
    traced = tf.function(sampler, input_signature=spec, autograph=False).get_concrete_function()
    weights = sum(int(v.shape.num_elements()) for v in traced.variables)
    try:
        if weights <= FROZEN_SAMPLER_LIMIT:
            # The converter reads a SavedModel. The weights are frozen into the graph first: a SavedModel
            # without variables is written and read back in about a second, where one with the model's
            # variables (and their save and restore functions) took most of the conversion's time.
            frozen = convert_variables_to_constants_v2(traced)
            named = tf.function(lambda temperature, seed: tf.nest.pack_sequence_as(traced.structured_outputs,
                                                                                  frozen(temperature, seed)),
                                input_signature=spec, autograph=False).get_concrete_function()
            tf.saved_model.save(tf.Module(), scratch, signatures={"sampler": named},
                                options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
        else:
            save_functions(model, scratch, {"sampler": (sampler, spec)})
        converter = tf.lite.TFLiteConverter.from_saved_model(scratch, signature_keys=["sampler"])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        flatbuffer = converter.convert()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return weights
