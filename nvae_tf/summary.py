"""`python -m nvae_tf.summary --flagfile=configs/X.flags [--json]`: the structure of a configured NVAE.

Prints the trainable parameter count, the numbers of convolutions and BatchNorm layers, the latent groups per
scale and the shape of every latent group. The model is built without data. With `--json` the last line is
one JSON object.
"""

import json

from nvae_tf import cli
from nvae_tf import config as config_lib
from nvae_tf.options import SummaryOptions


def model_structure(config):
    """Build the model of `config` and describe it as a dict (see the module docstring)."""
    import numpy as np

    from nvae_tf.model import NVAE
    model = NVAE(config)
    model.build()
    return {
        "dataset": config.dataset,
        "image_shape": list(config.image_shape),
        "parameters": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "conv_layers": len(model.conv_layers),
        "batchnorm_layers": len(model.batchnorm_layers),
        "num_groups": config.num_groups,
        "groups_per_scale": config.groups_per_scale,
        "latent_shapes": [list(shape) for shape in config.latent_shapes],
    }


def format_structure(info):
    groups = info["groups_per_scale"]
    lines = [
        f"dataset            {info['dataset']} {'x'.join(map(str, info['image_shape']))}",
        f"parameters         {info['parameters']:,} trainable",
        f"convolutions       {info['conv_layers']}",
        f"batchnorm layers   {info['batchnorm_layers']}",
        f"latent groups      {info['num_groups']}; per scale (high to low resolution): {groups}",
        "latent shapes      (top first, [height, width, channels])",
    ]
    shapes = info["latent_shapes"]
    start = 0
    while start < len(shapes):
        end = start
        while end < len(shapes) and shapes[end] == shapes[start]:
            end += 1
        lines.append(f"  groups {start:>3}-{end - 1:<3} {shapes[start]} x {end - start}")
        start = end
    return "\n".join(lines)


def run_from_flags(fv):
    info = model_structure(config_lib.from_flags(fv))
    print(format_structure(info))
    if fv.json:
        print(json.dumps(info))
    return 0


def main():
    cli.main("nvae_tf.summary", __doc__, [config_lib.NVAEConfig, SummaryOptions], run_from_flags,
             usage="--flagfile=configs/X.flags [--json]")


if __name__ == "__main__":
    main()
