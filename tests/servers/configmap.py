"""A directory laid out like a mounted Kubernetes ConfigMap, updated the way the kubelet updates it.

``<root>/warm-set.yaml -> ..data/warm-set.yaml`` and ``..data -> ..<version>``;
:meth:`ConfigMapDir.write` makes a new version directory, then renames a new
``..data`` symlink over the old one (one atomic swap: a reader sees the old file
or the new one, and the path it opened keeps naming the same file only until
the swap; the resolved path changes).
"""

from __future__ import annotations

import os
from pathlib import Path


class ConfigMapDir:
    def __init__(self, root: Path, name: str = "warm-set.yaml") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.n = 0
        self.path = root / name  # what the agent is given

    def write(self, text: str) -> None:
        self.n += 1
        version = self.root / f"..2026_01_01_00_00_{self.n:02d}.{os.getpid()}"
        version.mkdir()
        (version / self.name).write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.root / "..data")  # the atomic swap
        if not self.path.is_symlink():
            self.path.symlink_to(f"..data/{self.name}")
