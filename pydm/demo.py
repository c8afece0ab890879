"""The built-in demo stack served by ``pydm serve`` without a config.

Two sparse 32 MiB image files joined by a two-line linear table into
``demo-disk`` (64 MiB); over it ``demo-cache``, a writeboost write-back cache
whose log is ``cache.img`` (16 segments, 8 MiB); and on top ``demo``: an era
device tracking changed 64 KiB blocks, with its metadata in ``era-meta.img``.
Images are created on first use and kept, so data, the cache's log and change
tracking survive restarts.
"""

import os

from pydm.config import DeviceSpec
from pydm.errors import PydmError

IMAGE_BYTES = 32 << 20
META_BYTES = 8 << 20
CACHE_BYTES = (1 << 20) + 16 * (512 << 10)     # superblock + 16 segments
ERA_BLOCK_SECTORS = 128


def default_state_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                           ".local", "share")
    return os.path.join(base, "pydm", "demo")


def demo_specs(state_dir: str):
    try:
        os.makedirs(state_dir, exist_ok=True)
        for name, size in (("disk0.img", IMAGE_BYTES), ("disk1.img", IMAGE_BYTES),
                           ("cache.img", CACHE_BYTES), ("era-meta.img", META_BYTES)):
            path = os.path.join(state_dir, name)
            if not os.path.exists(path):
                with open(path, "wb") as f:
                    f.truncate(size)
    except OSError as e:
        raise PydmError(f"cannot prepare demo state in {state_dir}: {e.strerror}",
                        e.errno) from None
    sectors = IMAGE_BYTES >> 9
    disk = (f"0 {sectors} linear disk0.img 0\n"
            f"{sectors} {sectors} linear disk1.img 0\n")
    cache = f"0 {2 * sectors} writeboost dm:demo-disk cache.img\n"
    era = f"0 {2 * sectors} era era-meta.img dm:demo-cache {ERA_BLOCK_SECTORS}\n"
    return [DeviceSpec("demo-disk", disk, cwd=state_dir),
            DeviceSpec("demo-cache", cache, cwd=state_dir),
            DeviceSpec("demo", era, cwd=state_dir)]
