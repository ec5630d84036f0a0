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

Noise comes from `serving.HashNoise`: a server and a phone give the same images for the same seed and temperature.
"""

import os
import shutil
import time

from absl import logging

from nvae_tf import cli, options, runs
from nvae_tf.options import ExportOptions


def next_version(export_dir):
    versions = [int(d) for d in os.listdir(export_dir) if d.isdigit()] if os.path.isdir(export_dir) else []
    return max(versions, default=0) + 1


def manifest(model, config, signatures, version, checkpoint, tflite_files, tflite_batch, sampler_weights,
             readjusted):
    from nvae_tf.sampling import MAX_TEMPERATURE
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


def run(opts):
    """Export a run; returns the manifest (also written beside the exports)."""
    options.check(opts)
    from nvae_tf import sampling, serving
    temperature = sampling.check_temperature(opts.temperature)
    config, model, path = runs.load_model(opts.model_dir, opts.checkpoint)
    export_dir = opts.export_dir
    version = opts.version or next_version(export_dir)
    target = os.path.join(export_dir, str(version))
    if os.path.exists(target) and not opts.overwrite:
        raise runs.RunError(f"--version: {target} already exists; choose another version or pass --overwrite")
    pixels = sampling.pixel_mode(config, opts.pixels)
    readjusted = None
    if opts.readjust_bn:
        sampling.readjust_batchnorm(model, temperature, opts.bn_passes, opts.bn_batch)
        readjusted = temperature

    created = not os.path.exists(export_dir)
    os.makedirs(export_dir, exist_ok=True)
    start = time.time()
    # Everything is written to a staging directory first: a failed export leaves earlier exports as they were.
    staging = os.path.join(export_dir, f".staging-{version}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        logging.info("writing the SavedModel (version %d)", version)
        saved_model = os.path.join(staging, str(version))
        signatures = serving.export_saved_model(model, saved_model, opts.max_samples, pixels)
        tflite_files, weights = [], None
        if opts.tflite:
            variants = [("sampler.tflite", "none")] + ([("sampler_float16.tflite", "float16")]
                                                       if opts.tflite_quantize == "float16" else [])
            for name, quantize in variants:
                logging.info("converting the TFLite sampler %s (batch %d)", name, opts.tflite_batch)
                weights = serving.export_tflite(model, os.path.join(staging, name), opts.tflite_batch, pixels,
                                                quantize, scratch=os.path.join(staging, "tflite_savedmodel"))
                tflite_files.append(name)
        info = manifest(model, config, signatures, version, path, tflite_files, opts.tflite_batch, weights,
                        readjusted)
        extra = os.path.join(saved_model, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        for folder in (extra, staging):
            runs.write_json(os.path.join(folder, "manifest.json"), info)
            config.save(os.path.join(folder, "config.json"))
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(saved_model, target)
        for name in ("manifest.json", "config.json", *tflite_files):
            os.replace(os.path.join(staging, name), os.path.join(export_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not os.listdir(export_dir):  # a failed first export leaves no empty folder behind
            os.rmdir(export_dir)
    info["seconds"] = round(time.time() - start, 1)
    return info


def run_from_flags(fv):
    opts = options.from_flags(ExportOptions, fv)
    info = run(opts)
    print(f"SavedModel: {os.path.join(opts.export_dir, str(info['version']))} (signatures "
          f"{', '.join(info['signatures'])}; num_samples 1..{opts.max_samples}, temperature in (0, 2])")
    for name in (info["tflite"] or {}).get("files", []):
        path = os.path.join(opts.export_dir, name)
        print(f"TFLite sampler: {path} ({os.path.getsize(path) / 2 ** 20:.1f} MiB, batch {opts.tflite_batch})")
    print(f"manifest: {os.path.join(opts.export_dir, 'manifest.json')}  ({info['seconds']} s)")
    return 0


def main():
    cli.main("nvae_tf.export", __doc__, [ExportOptions], run_from_flags,
             usage="--model_dir=DIR --export_dir=DIR [flags]")


if __name__ == "__main__":
    main()
