"""Where pydm keeps its files (no imports beyond os: every CLI command
needs the socket path for its help text, most never open the socket)."""

import os


def default_socket_path() -> str:
    env = os.environ.get("PYDM_SOCKET")
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/pydm/control.sock"
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run:
        return os.path.join(run, "pydm", "control.sock")
    return f"/tmp/pydm-{os.getuid()}/control.sock"
