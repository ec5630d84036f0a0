import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_flagfile(name, **overrides):
    """An NVAEConfig from `configs/<name>.flags` with optional field overrides."""
    from nvae_tf.config import from_flagfile
    return from_flagfile(os.path.join(CONFIGS, name + ".flags"), **overrides)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield
