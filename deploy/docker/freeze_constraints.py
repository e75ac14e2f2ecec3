#!/usr/bin/env python3
"""Print ``name==version`` for every distribution installed in this interpreter.

The GPU image starts from vLLM's image, whose CUDA build of torch, vLLM itself and their pinned
dependencies were tested together. Installing conspo with these lines as pip constraints can add
packages but never replace one: a requirement that would need a different torch or vLLM fails
the build instead of silently pulling gigabytes of another CUDA stack. ``pip freeze`` would print
``name @ url`` for packages installed from a URL, which pip refuses as a constraint; this prints
plain versions (local labels such as ``+cu130`` included, which an ``==2.13.0`` requirement
accepts).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

# The package being installed on top must stay free to change version.
EXCLUDE = {"conspo"}


def constraints() -> list[str]:
    seen: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if not name or not dist.version:
            continue
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in EXCLUDE:
            continue
        seen.setdefault(key, f"{key}=={dist.version}")
    return sorted(seen.values())


if __name__ == "__main__":
    sys.stdout.write("\n".join(constraints()) + "\n")
