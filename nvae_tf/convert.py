"""`python -m nvae_tf.convert --checkpoint=checkpoint.pt --model_dir=runs/cifar10_official`: an NVIDIA NVAE checkpoint
as an nvae_tf run directory.

Reads the reference implementation's `checkpoint.pt` without PyTorch and without running pickled code
(`nvae_tf.torch_checkpoint`), builds the `NVAEConfig` its `args` describe, with the three reference-compatibility
fields on (`flow_elu_twice`, `reference_logistic`, `pixel_temperature`), gives every state_dict entry to its
nvae_tf variable and writes the config and a checkpoint at the checkpoint's step. `evaluate`, `sample` and
`export` then take the run directory as they take a trained one. Every entry is used exactly once: an entry
left over, or a variable left without one, stops the conversion and names it. The optimiser state is not
converted (the run evaluates, samples and exports; it does not resume training).
"""

import os
import shutil
import time

import numpy as np

from nvae_tf import cli, options, torch_checkpoint
from nvae_tf.errors import ConfigError, RunError, os_reason
from nvae_tf.options import ConvertOptions

# The reference's `--dataset` names and ours.
DATASETS = {"mnist": "mnist", "cifar10": "cifar10", "celeba_64": "celeba64", "imagenet_32": "imagenet32",
            "celeba_256": "celebahq", "ffhq": "ffhq"}

# `args` fields copied to the config field of the same name.
ARGS_FIELDS = (
    "num_x_bits", "num_channels_enc", "num_channels_dec", "num_preprocess_blocks", "num_preprocess_cells",
    "num_postprocess_blocks", "num_postprocess_cells", "num_latent_scales", "num_groups_per_scale", "ada_groups",
    "min_groups_per_scale", "num_latent_per_group", "num_cell_per_cond_enc", "num_cell_per_cond_dec", "num_nf",
    "num_mixture_dec", "use_se", "res_dist", "batch_size", "epochs", "learning_rate", "learning_rate_min",
    "warmup_epochs", "weight_decay", "weight_decay_norm", "weight_decay_norm_init", "weight_decay_norm_anneal",
    "kl_anneal_portion", "kl_const_portion", "kl_const_coeff", "seed")

# The one cell architecture nvae_tf builds (the reference's `--arch_instance res_mbconv`).
RES_MBCONV = {"normal_enc": ["res_bnswish", "res_bnswish"], "down_enc": ["res_bnswish", "res_bnswish"],
              "normal_dec": ["mconv_e6k5g0"], "up_dec": ["mconv_e6k5g0"], "normal_pre": ["res_bnswish", "res_bnswish"],
              "down_pre": ["res_bnswish", "res_bnswish"], "normal_post": ["mconv_e3k5g0"],
              "up_post": ["mconv_e3k5g0"], "ar_nn": [""]}

# How a reference tensor becomes an nvae_tf variable (and back, for shapes).
TRANSPOSES = {"conv": (2, 3, 1, 0), "depthwise": (2, 3, 0, 1), "dense": (1, 0), "prior": (1, 2, 0)}
COUNTER, ALIAS = "counter", "alias"


class ConversionError(RunError):
    """A checkpoint that cannot be converted; the message names the entry, the argument or the file."""


def config_from_args(args, arch_instance=None):
    """The `NVAEConfig` of a reference run's `args` (an argparse Namespace or a dict), with the reference-
    compatibility fields on. `ConversionError` naming the argument for anything nvae_tf does not build."""
    from nvae_tf.config import NVAEConfig
    from nvae_tf.config import structural_fields
    values = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    needed = ["dataset", *(name for name in ARGS_FIELDS if name in structural_fields())]
    missing = [name for name in needed if name not in values]
    if missing:
        raise ConversionError(f"the checkpoint's args lack {', '.join(missing)}: is it a checkpoint of NVAE's "
                              f"train.py?")
    if values["dataset"] not in DATASETS:
        raise ConversionError(f"args.dataset {values['dataset']!r} is not supported (supported: "
                              f"{', '.join(DATASETS)})")
    if values.get("arch_instance", "res_mbconv") != "res_mbconv":
        raise ConversionError(f"args.arch_instance {values['arch_instance']!r} is not supported (supported: "
                              f"res_mbconv)")
    if arch_instance is not None:
        for cell, ops in RES_MBCONV.items():
            if list(arch_instance.get(cell, [])) != ops:
                raise ConversionError(f"arch_instance[{cell!r}] is {arch_instance.get(cell)!r}; nvae_tf builds "
                                      f"{ops!r} (res_mbconv)")
    # Training settings a checkpoint does not record (none of the weights depend on them) keep our defaults.
    fields = {name: values[name] for name in ARGS_FIELDS if name in values}
    try:
        return NVAEConfig(dataset=DATASETS[values["dataset"]], flow_elu_twice=True, reference_logistic=True,
                          pixel_temperature=True, **fields)
    except ConfigError as e:
        raise ConversionError(f"the checkpoint's args: args.{e.flag}: {str(e).split(': ', 1)[1]}") from None
    except (TypeError, ValueError) as e:
        raise ConversionError(f"the checkpoint's args hold an unusable value: {e}") from None


# ----------------------------------------------------------------------------------------- the key map
def _conv(prefix, conv):
    kind = "depthwise" if conv.depthwise else "conv"
    yield prefix + "weight", conv.kernel, kind
    if conv.weight_norm:
        yield prefix + "log_weight_norm", conv.log_weight_norm, "log_norm"
    else:
        yield prefix + "weight_normalized", prefix + "weight", ALIAS
    if conv.use_bias:
        yield prefix + "bias", conv.bias, "vector"


def _bn(prefix, bn):
    yield prefix + "weight", bn.gamma, "vector"
    yield prefix + "bias", bn.beta, "vector"
    yield prefix + "running_mean", bn.moving_mean, "vector"
    yield prefix + "running_var", bn.moving_variance, "vector"
    yield prefix + "num_batches_tracked", None, COUNTER


def _se(prefix, cell):
    if cell.se is not None:
        for index, dense in ((0, cell.se.squeeze), (2, cell.se.excite)):
            yield f"{prefix}se.se.{index}.weight", dense.kernel, "dense"
            yield f"{prefix}se.se.{index}.bias", dense.bias, "vector"


def _encoder_cell(prefix, cell):
    for i, unit in enumerate(cell.branch):
        yield from _bn(f"{prefix}_ops.{i}.bn_act.", unit.bn)
        yield from _conv(f"{prefix}_ops.{i}.conv_0.", unit.conv)
    yield from _se(prefix, cell)
    if cell.skip is not None:
        for i, conv in enumerate(cell.skip.convs):
            yield from _conv(f"{prefix}skip.conv_{i + 1}.", conv)


def _generative_cell(prefix, cell):
    mb, o = cell.branch[0], 1 if cell.cell_type == "up" else 0
    p = f"{prefix}_ops.0.conv."
    yield from _bn(f"{p}{o}.", mb.bn_in)
    yield from _conv(f"{p}{1 + o}.conv.0.", mb.expand)
    yield from _bn(f"{p}{1 + o}.conv.1.", mb.bn_expand)
    yield from _conv(f"{p}{2 + o}.conv.0.", mb.depthwise)
    yield from _bn(f"{p}{2 + o}.conv.1.", mb.bn_depthwise)
    yield from _conv(f"{p}{3 + o}.", mb.project)
    yield from _bn(f"{p}{4 + o}.", mb.bn_out)
    yield from _se(prefix, cell)
    if cell.skip is not None:
        yield from _conv(f"{prefix}skip.1.", cell.skip.conv)


def reference_entries(model):
    """Every reference state_dict entry of `model`'s configuration as `(key, variable, kind)`: the key (as the
    reference names it without its synchronised-BN wrapper, see `normalize_key`), the nvae_tf variable it sets,
    and how (`TRANSPOSES`, `log_norm`, `vector`; `ALIAS` entries repeat another key's tensor; `COUNTER`
    entries, BN's `num_batches_tracked`, set nothing)."""
    c = model.config
    yield "prior_ftr0", model.prior_ftr0, "prior"
    yield from _conv("stem.", model.stem)
    for i, cell in enumerate(model.preprocess):
        yield from _encoder_cell(f"pre_process.{i}.", cell)
    groups, n = c.groups_per_scale, c.num_groups
    cells, index, encoder_group = iter(model.encoder_tower), 0, 0
    for scale, num_groups in enumerate(groups):
        for g in range(num_groups):
            for _ in range(c.num_cell_per_cond_enc):
                yield from _encoder_cell(f"enc_tower.{index}.", next(cells))
                index += 1
            if not (scale == len(groups) - 1 and g == num_groups - 1):
                yield from _conv(f"enc_tower.{index}.conv.", model.latent_groups[n - 1 - encoder_group]
                                 .encoder_combiner)
                index += 1
            encoder_group += 1
        if scale < len(groups) - 1:
            yield from _encoder_cell(f"enc_tower.{index}.", next(cells))
            index += 1
    yield from _conv("enc0.1.", model.enc0)
    for k, group in enumerate(model.latent_groups):
        yield from _conv(f"enc_sampler.{k}.", group.posterior_sampler)
    for k, group in enumerate(model.latent_groups[1:]):
        yield from _conv(f"dec_sampler.{k}.1.", group.prior_sampler)
    for k, group in enumerate(model.latent_groups):
        for f in range(c.num_nf):
            for name, flow in (("cell1", group.flows[2 * f]), ("cell2", group.flows[2 * f + 1])):
                prefix = f"nf_cells.{k * c.num_nf + f}.{name}."
                yield from _conv(prefix + "conv.convz.0.", flow.conv_in)
                yield from _conv(prefix + "conv.convz.2.", flow.conv_depthwise)
                yield from _conv(prefix + "mu.conv_0.", flow.conv_out)
    scales, index = c.group_scales, 0
    for k, group in enumerate(model.latent_groups):
        for cell in group.cells:
            yield from _generative_cell(f"dec_tower.{index}.", cell)
            index += 1
        yield from _conv(f"dec_tower.{index}.conv.", group.decoder_combiner)
        index += 1
        if k + 1 < len(scales) and scales[k + 1] != scales[k]:
            yield from _generative_cell(f"dec_tower.{index}.", model.decoder_up_cells[scales[k]])
            index += 1
    for i, cell in enumerate(model.postprocess):
        yield from _generative_cell(f"post_process.{i}.", cell)
    yield from _conv("image_conditional.1.", model.head)


def normalize_key(key):
    """A state_dict key without a DataParallel `module.` prefix and without the `.bn.` of the reference's
    synchronised-BN wrapper (GPU runs name `..._ops.0.conv.0.bn.weight` what CPU runs name
    `..._ops.0.conv.0.weight`)."""
    if key.startswith("module."):
        key = key[len("module."):]
    return key.replace(".bn.", ".")


def reference_listing(model):
    """`{key: shape}` of every reference state_dict entry of `model`'s configuration (as `normalize_key` names
    them): what its state_dict holds, for comparison with a listing of the reference's."""
    listing = {}
    for key, variable, kind in reference_entries(model):
        listing[key] = (() if kind == COUNTER else listing[variable] if kind == ALIAS
                        else reference_shape(variable, kind))
    return listing


def reference_shape(variable, kind):
    """The shape the reference stores for `variable` converted by `kind`."""
    shape = tuple(variable.shape)
    if kind in TRANSPOSES:
        inverse = np.argsort(TRANSPOSES[kind])
        return tuple(shape[i] for i in inverse)
    if kind == "log_norm":
        return (shape[0], 1, 1, 1)
    return shape


def to_variable_value(array, kind):
    if kind in TRANSPOSES:
        return np.transpose(array, TRANSPOSES[kind])
    if kind == "log_norm":
        return array.reshape(-1)
    return array


def assign_state_dict(model, state_dict):
    """Set every model variable the reference has from `state_dict` (key -> NumPy array). Returns the number of
    entries used. `ConversionError` for an entry left over, a variable left unset, a shape that differs, an
    alias that is not a copy of its entry, or a non-finite value."""
    entries = {key: (variable, kind) for key, variable, kind in reference_entries(model)}
    given = {}
    for key, value in state_dict.items():
        name = normalize_key(key)
        if name in given:
            raise ConversionError(f"state_dict entries {key!r} and another name the same tensor {name!r}")
        given[name] = (key, value)
    left_over = [given[name][0] for name in given if name not in entries]
    if left_over:
        raise ConversionError(f"{len(left_over)} state_dict entr{'y' if len(left_over) == 1 else 'ies'} "
                              f"match no nvae_tf variable of this configuration, first {left_over[0]!r} "
                              f"{list(np.shape(given[normalize_key(left_over[0])][1]))}; the checkpoint's args "
                              f"may not describe its weights")
    unset = [name for name in entries if name not in given]
    if unset:
        variable = entries[unset[0]][0]
        target = f" (nvae_tf {variable.path})" if hasattr(variable, "path") else ""
        raise ConversionError(f"{len(unset)} nvae_tf variable{'s are' if len(unset) > 1 else ' is'} missing from "
                              f"the state_dict, first {unset[0]!r}{target}")
    for name, (variable, kind) in entries.items():
        key, value = given[name]
        value = np.asarray(value)
        if kind == COUNTER:
            continue
        if kind == ALIAS:
            if not np.array_equal(value, np.asarray(given[variable][1])):
                raise ConversionError(f"state_dict entry {key!r} differs from {given[variable][0]!r}; it should "
                                      f"be the same tensor under a second name")
            continue
        expected = reference_shape(variable, kind)
        if tuple(value.shape) != expected:
            raise ConversionError(f"state_dict entry {key!r} has shape {list(value.shape)}, the configuration "
                                  f"needs {list(expected)} (nvae_tf {variable.path})")
        if not np.all(np.isfinite(value)):
            raise ConversionError(f"state_dict entry {key!r} holds a non-finite value")
        variable.assign(to_variable_value(value, kind).astype(variable.dtype))
    return len(given)


# ------------------------------------------------------------------------------------------------ command
def convert(checkpoint, model_dir, log=print):
    """Convert the reference checkpoint file `checkpoint` into the run directory `model_dir`; returns
    `(config, checkpoint prefix)`."""
    from nvae_tf import runs
    if os.path.exists(os.path.join(model_dir, "config.json")):
        raise RunError(f"--model_dir: {model_dir} already holds a run; convert into a new directory")
    if os.path.exists(model_dir) and (not os.path.isdir(model_dir) or os.listdir(model_dir)):
        raise RunError(f"--model_dir: {model_dir} exists and is not an empty directory; convert into a new one")
    started = time.time()
    size = os.path.getsize(checkpoint) if os.path.isfile(checkpoint) else 0
    log(f"reading {checkpoint} ({size / 2 ** 20:.0f} MiB) without PyTorch...")
    try:
        saved = torch_checkpoint.load(checkpoint)
    except torch_checkpoint.CheckpointReadError as e:
        raise ConversionError(str(e)) from None
    if not isinstance(saved, dict) or not {"state_dict", "args"} <= set(saved):
        keys = ", ".join(map(str, list(saved)[:8])) if isinstance(saved, dict) else type(saved).__name__
        raise ConversionError(f"{checkpoint} is a PyTorch file but not an NVAE training checkpoint (it has no "
                              f"'state_dict' and 'args'; it holds: {keys})")
    state_dict = saved["state_dict"]
    config = config_from_args(saved["args"], saved.get("arch_instance"))
    step = int(saved.get("global_step") or 0)
    log(f"read {len(state_dict)} state_dict entries in {time.time() - started:.1f} s: {config.dataset}, "
        f"epoch {saved.get('epoch')}, step {step}")

    import tensorflow as tf

    from nvae_tf.model import NVAE
    started = time.time()
    model = NVAE(config)
    model.build()
    params = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    log(f"built NVAE: {params / 1e6:.1f}M parameters in {time.time() - started:.1f} s")
    used = assign_state_dict(model, state_dict)
    # Written next to model_dir and renamed into place at the end: a failed write leaves no half run behind.
    staging = f"{os.path.normpath(model_dir)}.converting-{os.getpid()}"
    try:
        runs.save_model(staging, model, step=step)
        runs.write_json(os.path.join(staging, "converted_from.json"),
                        {"checkpoint": os.path.abspath(checkpoint), "epoch": saved.get("epoch"), "global_step": step,
                         "dataset": getattr(saved["args"], "dataset", None), "state_dict_entries": used})
        os.replace(staging, model_dir)
    except (OSError, tf.errors.OpError) as e:
        raise RunError(f"--model_dir: cannot write {model_dir} ({os_reason(e)}); nothing was written") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    prefix = runs.find_checkpoint(model_dir)
    log(f"used all {used} entries; wrote {prefix}")
    return config, prefix


def run_from_flags(fv):
    opts = options.check(options.from_flags(ConvertOptions, fv))
    from absl import logging
    config, prefix = convert(opts.checkpoint, opts.model_dir, log=logging.info)
    print(f"converted {opts.checkpoint} -> {opts.model_dir} ({config.dataset}, {os.path.basename(prefix)}); next: "
          f"python -m nvae_tf.evaluate --model_dir={opts.model_dir}")
    return 0


def main():
    cli.main("nvae_tf.convert", __doc__, [ConvertOptions], run_from_flags,
             usage="--checkpoint=checkpoint.pt --model_dir=DIR")


if __name__ == "__main__":
    main()
