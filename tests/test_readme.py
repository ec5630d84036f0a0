"""The README's quick start stays true: every `python -m nvae_tf.X` of its first command names a command that
exists, flags that command lists in its `--help` (with a value among the listed choices), and config files that
parse. (The commands themselves are exercised by the other tests; this catches a README left behind by a
renamed flag, config or choice.)"""

import os
import re
import subprocess
import sys

import pytest

from conftest import child_env
from nvae_tf.config import from_flagfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_start_commands():
    """[(module, [args])] of the quick start's first command (the line that sets up and trains)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = [line for line in f if line.startswith("python3 -m venv") and "nvae_tf.train" in line]
    assert len(lines) == 1, f"expected one quick-start training command in README.md, found {len(lines)}"
    commands = []
    for part in lines[0].strip().split(" && "):
        words = part.split()
        if words[:2] == ["python", "-m"] and words[2].startswith("nvae_tf."):
            commands.append((words[2], words[3:]))
    return commands


def listed_flags(module):
    """{name: choices or None} from `python -m module --help`."""
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=child_env(), capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    found = {}
    for m in re.finditer(r"^\s+--(\[no\])?([a-z_0-9]+)(=(\S+))?", r.stdout, re.M):
        value = m.group(4) or ""
        found[m.group(2)] = value.split("|") if "|" in value else None
    return found


def test_the_quick_start_names_five_commands_in_order():
    assert [m for m, _ in quick_start_commands()] == ["nvae_tf.data", "nvae_tf.train", "nvae_tf.evaluate",
                                                     "nvae_tf.sample", "nvae_tf.export"]


@pytest.mark.parametrize("module,args", quick_start_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_quick_start_flag_is_one_its_command_lists(module, args):
    flags = listed_flags(module)
    for arg in args:
        assert arg.startswith("--"), f"{module}: {arg!r} is not a flag"
        name, _, value = arg[2:].partition("=")
        if name == "flagfile":
            assert os.path.isfile(os.path.join(ROOT, value)), f"{module}: {value} does not exist"
            from_flagfile(os.path.join(ROOT, value))  # a config that parses
            continue
        base = name[2:] if name.startswith("no") and name[2:] in flags else name
        assert base in flags, f"{module} has no --{base} (its --help lists {sorted(flags)})"
        if flags[base] is not None:
            assert value in flags[base], f"{module} --{base}={value}: not one of {flags[base]}"
