"""Generates the Python stubs of RTAP's contract from ../../proto into gen/.

Run `python generate.py` (the tests do it themselves); gen/ is not committed.
"""

import pathlib
import sys

from grpc_tools import protoc
import grpc_tools

HERE = pathlib.Path(__file__).resolve().parent
PROTO = HERE.parent.parent / "proto"
GEN = HERE / "gen"


def generate() -> pathlib.Path:
    """Compiles every rtap/v1 proto file; returns the folder to import from."""
    GEN.mkdir(exist_ok=True)
    files = sorted(str(p.relative_to(PROTO)) for p in (PROTO / "rtap" / "v1").glob("*.proto"))
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO}",
            f"-I{well_known}",
            f"--python_out={GEN}",
            f"--grpc_python_out={GEN}",
            *files,
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}")
    for package in (GEN / "rtap", GEN / "rtap" / "v1"):
        (package / "__init__.py").touch()
    return GEN


if __name__ == "__main__":
    print(generate())
    sys.exit(0)
