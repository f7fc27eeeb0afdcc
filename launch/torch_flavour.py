"""Which CUDA a torch wheel is built for, read from the wheel's own metadata (no install, no GPU):

    python launch/torch_flavour.py torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl      -> cu13

Prints cu12, cu13 (any CUDA major: cuNN) or cpu. PyTorch's own indexes mark the build in the local version
(2.14.1+cu128, 2.13.0+cpu); PyPI's Linux wheels carry no local version and are told apart by what they require:
nvidia-*-cu12 wheels (torch <= 2.10, CUDA 12.8), or the cuda-toolkit[...]==13.x metapackage and nvidia-*-cu13 wheels
(torch >= 2.11, CUDA 13.0). launch/wheelhouse.sh refuses a wheel whose flavour is not the one asked for.
"""
from __future__ import annotations

import re
import sys
import zipfile


def flavour(metadata: str) -> str:
    version = re.search(r"^Version: (\S+)", metadata, re.M)
    if version is None:
        raise ValueError("no Version: line in the metadata")
    local = re.search(r"\+(cpu|cu(\d\d)\d)", version.group(1))
    if local:
        return "cpu" if local.group(1) == "cpu" else f"cu{local.group(2)}"
    deps = [d.split(";")[0].strip() for d in re.findall(r"^Requires-Dist: (.*)$", metadata, re.M)
            if "extra ==" not in d]
    for d in deps:
        m = (re.match(r"nvidia-[a-z-]+-cu(\d\d)\b", d) or re.match(r"cuda-toolkit(?:\[[^]]*\])?==(\d\d)\.", d)
             or re.match(r"cuda-bindings==(\d\d)\.", d))
        if m:
            return f"cu{m.group(1)}"
    return "cpu"


def wheel_metadata(path: str) -> str:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: torch_flavour.py TORCH_WHEEL")
    print(flavour(wheel_metadata(sys.argv[1])))
