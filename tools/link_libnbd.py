"""Make libnbd's Python bindings importable in this venv.

libnbd's bindings are not on PyPI: Debian ships them for its own python3
(python3-libnbd: nbd.py and libnbdmod.*.so in dist-packages).  pydm's NBD
store and tests need them in the venv, so this links those two files into
the venv's site-packages when the system python3 has the same version
(the extension module is built for one version).  Run with the venv's
python; exits 0 with a note when it cannot (the NBD store then says what is
missing when a table names nbd://).
"""

import os
import subprocess
import sys
import sysconfig

ASK = ("import nbd, libnbdmod, sys; print(sys.version_info[0], sys.version_info[1]); "
       "print(nbd.__file__); print(libnbdmod.__file__)")


def main():
    try:
        import nbd  # noqa: F401
        return 0
    except ImportError:
        pass
    r = subprocess.run(["/usr/bin/python3", "-c", ASK], capture_output=True, text=True)
    if r.returncode != 0:
        print("link_libnbd: the system python3 has no libnbd bindings "
              "(install python3-libnbd)", file=sys.stderr)
        return 0
    version, mod, ext = r.stdout.split("\n")[:3]
    major, minor = version.split()
    if (int(major), int(minor)) != sys.version_info[:2]:
        print(f"link_libnbd: python3-libnbd is built for Python {major}.{minor}, this venv "
              f"runs {sys.version_info[0]}.{sys.version_info[1]}: not linked", file=sys.stderr)
        return 0
    site = sysconfig.get_paths()["platlib"]
    for path in (mod, ext):
        dst = os.path.join(site, os.path.basename(path))
        if os.path.lexists(dst):
            os.unlink(dst)
        os.symlink(path, dst)
    print(f"link_libnbd: linked {os.path.basename(mod)} and {os.path.basename(ext)} into {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
