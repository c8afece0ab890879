"""The built-in demo stack served by ``pydm serve`` without a config.

Two sparse 32 MiB image files in the state directory, joined by a two-line
linear table into one 64 MiB device named ``demo``.  Images are created on
first use and kept, so data written to the demo survives restarts.
"""

import os

from pydm.config import DeviceSpec
from pydm.errors import PydmError

IMAGE_BYTES = 32 << 20


def default_state_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                           ".local", "share")
    return os.path.join(base, "pydm", "demo")


def demo_specs(state_dir: str):
    try:
        os.makedirs(state_dir, exist_ok=True)
        for name in ("disk0.img", "disk1.img"):
            path = os.path.join(state_dir, name)
            if not os.path.exists(path):
                with open(path, "wb") as f:
                    f.truncate(IMAGE_BYTES)
    except OSError as e:
        raise PydmError(f"cannot prepare demo state in {state_dir}: {e.strerror}",
                        e.errno) from None
    sectors = IMAGE_BYTES >> 9
    table = (f"0 {sectors} linear disk0.img 0\n"
             f"{sectors} {sectors} linear disk1.img 0\n")
    return [DeviceSpec("demo", table, cwd=state_dir)]
