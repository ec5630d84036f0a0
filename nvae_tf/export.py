"""`python -m nvae_tf.export --model_dir=runs/X --export_dir=exports/X`: a run as deployable samplers.

Writes, under `export_dir`:

    <version>/                 SavedModel in TF Serving's layout (serving loads the highest version)
      saved_model.pb, variables/
      assets.extra/manifest.json, assets.extra/config.json
    sampler.tflite             TFLite sampler: builtin ops only, runs with the stock LiteRT interpreter
    sampler_float16.tflite     with --tflite_quantize=float16
    manifest.json, config.json the latest export's manifest and model config

SavedModel signatures:
  serving_default  num_samples int32, temperature float32, seed int64 -> images uint8 [num_samples, H, W, C]
  reconstruct      images uint8 [batch, H, W, C] -> images uint8 (one posterior sample, decoded)
  nelbo            images uint8 [batch, H, W, C] -> bpd float32 [batch] (negative ELBO in bits/dim)
Inputs are declared with unknown shapes and checked in the graph before any other op reads them: scalars
with 1 <= num_samples <= --max_samples and 0 < temperature <= 2 (NaN, infinities and denormals refused),
images of exactly [1..--max_samples, H, W, C]. A bad request fails with one InvalidArgument error naming the
input and what it must be, e.g. "images must be [1..64, 16, 16, 1] uint8, got shape] [16 16 1]".

The TFLite sampler cannot raise errors with builtin ops: a temperature the SavedModel refuses gives all-zero
images and the output valid = 0; any other gives valid = 1 and the SavedModel's images.

Noise comes from `HashNoise`, a counter-based generator made of builtin integer ops (xor, multiply, floor
division and modulo), used by the SavedModel and the TFLite sampler alike, so a server and a phone give the
same images for the same seed and temperature.
"""

import json
import math
import os
import shutil
import struct
import sys
import time

from absl import app, flags, logging

from nvae_tf import runs
from nvae_tf.sample import MAX_TEMPERATURE, check_temperature, pixel_mode, readjust_batchnorm

FLAGS = flags.FLAGS
SEED_MODULUS = 2 ** 31 - 1
_MIX_1, _MIX_2 = 0x7FEB352D, 0x846CA68B - 2 ** 32  # multipliers of a 32-bit integer hash (as int32)
_STREAM = 0x2545F491
_MIN_TEMPERATURE_BITS = 0x00800000  # the bits of the smallest normal float32, 2^-126
_MAX_TEMPERATURE_BITS = struct.unpack("<i", struct.pack("<f", MAX_TEMPERATURE))[0]


def define_flags():
    flags.DEFINE_string("model_dir", None, "Run directory written by nvae_tf.train.")
    flags.DEFINE_string("export_dir", None, "Where to write the SavedModel versions and the TFLite sampler.")
    flags.DEFINE_string("checkpoint", None, "Checkpoint prefix or step number (default: the latest).")
    flags.DEFINE_integer("version", 0, "SavedModel version directory (default: one above the highest present).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing version directory.")
    flags.DEFINE_float("temperature", 0.7, "Temperature of the samples that --readjust_bn re-estimates the "
                       "BatchNorm statistics from; each request chooses its own sampling temperature.")
    flags.DEFINE_bool("readjust_bn", False, "Re-estimate BatchNorm statistics from samples at --temperature "
                      "before exporting.")
    flags.DEFINE_integer("bn_passes", 500, "Sampling passes for --readjust_bn.")
    flags.DEFINE_integer("bn_batch", 16, "Images per pass for --readjust_bn.")
    flags.DEFINE_integer("max_samples", 64, "Largest num_samples (and image batch) a request may ask for.")
    flags.DEFINE_integer("tflite_batch", 1, "Images per call of the TFLite sampler (fixed).")
    flags.DEFINE_enum("tflite_quantize", "none", ["none", "float16"], "Also write a float16-quantised sampler.")
    flags.DEFINE_enum("pixels", "auto", ["auto", "sample", "mean"], "Pixel values of sampled images: a draw from "
                      "p(x|z), its mean, or auto (mean for binary images, a draw otherwise).")
    flags.DEFINE_bool("tflite", True, "Write the TFLite sampler.")


# ------------------------------------------------------------------------------------------------- noise
def _shift_right(x, bits):
    """Logical right shift of int32 values (as unsigned 32-bit), with floor division and modulo only."""
    import tensorflow as tf
    return tf.math.floormod(tf.math.floordiv(x, 2 ** bits), 2 ** (32 - bits))


def hash32(x):
    """A 32-bit integer hash (xor-shift-multiply) on int32 tensors, wrapping like unsigned arithmetic."""
    import tensorflow as tf
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
        import tensorflow as tf
        seed = tf.cast(tf.math.floormod(tf.cast(seed, tf.int64), SEED_MODULUS), tf.int32)
        self.key = hash32(hash32(seed) + 1)
        self.draws = 0

    def _bits(self, shape):
        import tensorflow as tf
        self.draws += 1
        stream = hash32(tf.bitwise.bitwise_xor(self.key, self.draws * _STREAM))
        count = tf.reduce_prod(tf.cast(shape, tf.int32))
        return tf.reshape(hash32(tf.bitwise.bitwise_xor(tf.range(count, dtype=tf.int32), stream)), shape)

    def uniform(self, shape, dtype="float32"):
        import tensorflow as tf
        u = (tf.cast(_shift_right(self._bits(shape), 8), tf.float32) + 0.5) * 2.0 ** -24
        return tf.cast(u, dtype)

    def normal(self, shape, dtype="float32"):
        import tensorflow as tf
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
    import tensorflow as tf
    bits = tf.bitcast(temperature, tf.int32)
    return tf.logical_and(bits >= _MIN_TEMPERATURE_BITS, bits <= _MAX_TEMPERATURE_BITS)


def _to_uint8(images):
    import tensorflow as tf
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
    import tensorflow as tf
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
        import tensorflow as tf
        return {signature: [tf.TensorSpec(None, tf.as_dtype(dtype), name=name)
                            for name, (dtype, _, _) in inputs.items()]
                for signature, inputs in self.inputs().items()}

    def _scalar_rule(self, name, value, in_range=None):
        import tensorflow as tf
        _, shape, requirement = self.inputs()["serving_default"][name]
        ok = tf.equal(tf.rank(value), 0)
        if in_range is not None:  # elementwise, so that it runs on a value of any shape
            ok = tf.logical_and(ok, tf.reduce_all(in_range))
        return name, value, ok, requirement, "got", value, shape

    def _image_rule(self, images):
        import tensorflow as tf
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
        import tensorflow as tf
        rules = [self._scalar_rule("num_samples", num_samples,
                                   tf.logical_and(num_samples >= 1, num_samples <= self.max_samples)),
                 self._scalar_rule("temperature", temperature, temperature_ok(temperature)),
                 self._scalar_rule("seed", seed)]
        return {"images": _to_uint8(self.sample_pixels(*_checked(rules)))}

    def reconstruct(self, images):
        """{"images": uint8 `[batch, H, W, C]`}: each of `images` decoded from one posterior sample."""
        import tensorflow as tf
        images, = _checked([self._image_rule(images)])
        noise = HashNoise(tf.constant(0, tf.int64))
        out = self.model(images, training=False, noise=noise)
        pixels = self.model.decode_pixels(out["decoder_params"], mode=self.pixels, noise=noise)
        return {"images": _to_uint8(pixels)}

    def nelbo(self, images):
        """{"bpd": float32 `[batch]`}: the negative ELBO of each of `images` in bits per dimension."""
        import tensorflow as tf
        images, = _checked([self._image_rule(images)])
        out = self.model(images, training=False, noise=HashNoise(tf.constant(0, tf.int64)))
        nats = -out["recon_log_prob"] + tf.reduce_sum(out["kl"], axis=1)
        return {"bpd": tf.cast(nats / (math.log(2.0) * self.config.data_dims), tf.float32)}


def save_functions(model, path, functions):
    """A SavedModel at `path` whose signatures are `functions` ({name: (python function, input specs)}).

    The SavedModel tracks the model's underlying `tf.Variable`s directly: Keras's ExportArchive (Keras 3.15)
    saves every weight twice, once per Keras variable and once per captured `tf.Variable`, doubling the
    SavedModel on disk and in the server's memory. Returns {name: concrete function}.
    """
    import tensorflow as tf
    module = tf.Module()
    module.model_variables = [v.value for v in model.variables]  # the backing tf.Variables
    concrete = {}
    for name, (fn, spec) in functions.items():
        traced = tf.function(fn, input_signature=spec, autograph=False)
        setattr(module, name, traced)
        concrete[name] = traced.get_concrete_function()
    tf.saved_model.save(module, path, signatures=concrete)
    return concrete


def export_saved_model(model, path, max_samples=64, pixels="sample"):
    """Write the SavedModel with the three signatures to `path`."""
    signatures = Signatures(model, max_samples, pixels)
    save_functions(model, path, {name: (getattr(signatures, name), spec)
                                 for name, spec in signatures.specs().items()})
    return signatures


def export_tflite(model, path, batch=1, pixels="sample", quantize="none", scratch=None):
    """Write the TFLite sampler, converted with builtin ops only. Returns the number of sampler weights.

    Inputs `temperature` float32 and `seed` int64 (scalars); outputs `images` uint8 `[batch, H, W, C]` and
    `valid` int32 scalar. A temperature in (0, 2] gives valid = 1 and the SavedModel's images for that seed and
    temperature; any other temperature (NaN, infinities and denormals included) gives valid = 0 and all-zero
    images.
    """
    import tensorflow as tf
    signatures = Signatures(model, batch, pixels)

    def sampler(temperature, seed):
        # tf.debugging asserts are not TFLite builtins: a refused temperature is reported in an output instead.
        valid = temperature_ok(temperature)
        pixels = signatures.sample_pixels(batch, temperature, seed)
        # Selected before the uint8 cast: TFLite's SELECT_V2 takes no uint8 (and NaN pixels never reach a cast).
        return {"images": _to_uint8(tf.where(valid, pixels, 0.0)), "valid": tf.cast(valid, tf.int32)}

    spec = [tf.TensorSpec([], tf.float32, name="temperature"), tf.TensorSpec([], tf.int64, name="seed")]
    scratch = scratch or path + ".savedmodel.tmp"
    try:
        traced = save_functions(model, scratch, {"sampler": (sampler, spec)})["sampler"]
        weights = sum(int(v.shape.num_elements()) for v in traced.variables)
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


# ------------------------------------------------------------------------------------------------- run
def next_version(export_dir):
    versions = [int(d) for d in os.listdir(export_dir) if d.isdigit()] if os.path.isdir(export_dir) else []
    return max(versions, default=0) + 1


def manifest(model, config, signatures, version, checkpoint, tflite_files, tflite_batch, sampler_weights,
             readjusted):
    spec = {signature: [{"name": name, "dtype": dtype, "shape": shape, "requirement": requirement}
                        for name, (dtype, shape, requirement) in inputs.items()]
            for signature, inputs in signatures.inputs().items()}
    outputs = {"serving_default": {"images": {"dtype": "uint8", "shape": [None, *config.image_shape]}},
               "reconstruct": {"images": {"dtype": "uint8", "shape": [None, *config.image_shape]}},
               "nelbo": {"bpd": {"dtype": "float32", "shape": [None]}}}
    return {
        "format": "nvae_tf export 1",
        "version": version,
        "dataset": config.dataset,
        "image_size": config.image_shape[0],
        "image_shape": list(config.image_shape),
        "channels": config.image_shape[-1],
        "num_x_bits": config.num_x_bits,
        "latent_shapes": [list(s) for s in config.latent_shapes],
        "parameters": int(sum(int(v.shape.num_elements()) for v in model.trainable_variables)),
        "checkpoint": checkpoint,
        "step": runs.checkpoint_step(checkpoint),
        "batchnorm": f"readjusted at temperature {readjusted}" if readjusted else "training statistics",
        "pixels": signatures.pixels,
        "limits": {"num_samples": [1, signatures.max_samples], "temperature": [0.0, MAX_TEMPERATURE],
                   "temperature_note": f"0 < temperature <= {MAX_TEMPERATURE:g}; NaN, infinities and denormals "
                                       "(below 1.2e-38) are refused"},
        "signatures": {name: {"inputs": spec[name], "outputs": outputs[name]} for name in spec},
        "input_checks": "inputs are declared with unknown shapes and checked in the graph before any other op "
                        "reads them; a request that fails a check gets INVALID_ARGUMENT "
                        "'<input> must be <requirement>, got ...'",
        "tflite": {"files": tflite_files, "batch": tflite_batch, "sampler_weights": sampler_weights,
                   "inputs": {"temperature": "float32 scalar", "seed": "int64 scalar"},
                   "outputs": {"images": f"uint8 {[tflite_batch, *config.image_shape]}; all zero when valid is 0",
                               "valid": f"int32 scalar: 1 if 0 < temperature <= {MAX_TEMPERATURE:g}, else 0 "
                                        "(NaN, infinities and denormals included)"}} if tflite_files else None,
        "noise": "HashNoise: counter-based 32-bit integer hash, seed reduced modulo 2^31 - 1; identical in the "
                 "SavedModel and the TFLite sampler",
    }


def run(model_dir, export_dir, version=0, checkpoint=None, temperature=0.7, readjust_bn=False, bn_passes=500,
        bn_batch=16, max_samples=64, tflite=True, tflite_batch=1, tflite_quantize="none", pixels="auto",
        overwrite=False):
    """Export a run; returns the manifest (also written beside the exports)."""
    if not export_dir:
        raise runs.RunError("--export_dir is required")
    temperature = check_temperature(temperature)
    if max_samples < 1:
        raise runs.RunError(f"--max_samples must be >= 1, got {max_samples}")
    if tflite_batch < 1:
        raise runs.RunError(f"--tflite_batch must be >= 1, got {tflite_batch}")
    if version < 0:
        raise runs.RunError(f"--version must be >= 1, got {version}")
    config, model, path = runs.load_model(model_dir, checkpoint)
    version = version or next_version(export_dir)
    target = os.path.join(export_dir, str(version))
    if os.path.exists(target) and not overwrite:
        raise runs.RunError(f"--version: {target} already exists; choose another version or pass --overwrite")
    pixels = pixel_mode(config, pixels)
    readjusted = None
    if readjust_bn:
        logging.info("re-estimating BatchNorm statistics: %d passes of %d samples at t = %g", bn_passes, bn_batch,
                     temperature)
        readjust_batchnorm(model, temperature, bn_passes, bn_batch)
        readjusted = temperature

    os.makedirs(export_dir, exist_ok=True)
    start = time.time()
    # Everything is written to a staging directory first: a failed export leaves earlier exports as they were.
    staging = os.path.join(export_dir, f".staging-{version}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        logging.info("writing the SavedModel (version %d)", version)
        saved_model = os.path.join(staging, str(version))
        signatures = export_saved_model(model, saved_model, max_samples, pixels)
        tflite_files, weights = [], None
        if tflite:
            variants = [("sampler.tflite", "none")] + ([("sampler_float16.tflite", "float16")]
                                                       if tflite_quantize == "float16" else [])
            for name, quantize in variants:
                logging.info("converting the TFLite sampler %s (batch %d)", name, tflite_batch)
                weights = export_tflite(model, os.path.join(staging, name), tflite_batch, pixels, quantize,
                                        scratch=os.path.join(staging, "tflite_savedmodel"))
                tflite_files.append(name)
        info = manifest(model, config, signatures, version, path, tflite_files, tflite_batch, weights, readjusted)
        extra = os.path.join(saved_model, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        for folder in (extra, staging):
            with open(os.path.join(folder, "manifest.json"), "w") as f:
                json.dump(info, f, indent=2)
            config.save(os.path.join(folder, "config.json"))
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(saved_model, target)
        for name in ("manifest.json", "config.json", *tflite_files):
            os.replace(os.path.join(staging, name), os.path.join(export_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    info["seconds"] = round(time.time() - start, 1)
    return info


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        info = run(FLAGS.model_dir, FLAGS.export_dir, FLAGS.version, FLAGS.checkpoint, FLAGS.temperature,
                   FLAGS.readjust_bn, FLAGS.bn_passes, FLAGS.bn_batch, FLAGS.max_samples, FLAGS.tflite,
                   FLAGS.tflite_batch, FLAGS.tflite_quantize, FLAGS.pixels, FLAGS.overwrite)
    except runs.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"SavedModel: {os.path.join(FLAGS.export_dir, str(info['version']))} (signatures "
          f"{', '.join(info['signatures'])}; num_samples 1..{FLAGS.max_samples}, temperature in (0, 2])")
    for name in (info["tflite"] or {}).get("files", []):
        path = os.path.join(FLAGS.export_dir, name)
        print(f"TFLite sampler: {path} ({os.path.getsize(path) / 2 ** 20:.1f} MiB, batch {FLAGS.tflite_batch})")
    print(f"manifest: {os.path.join(FLAGS.export_dir, 'manifest.json')}  ({info['seconds']} s)")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
