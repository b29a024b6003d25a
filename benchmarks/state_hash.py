"""sha256 of a saved model's tensors (key, dtype, shape and bytes of every tensor, sorted by key; statistics files
excluded): two folders with the same digest hold the same masks and weights, whatever wrote them.

    python benchmarks/state_hash.py runs/a runs/b

Used to show that a refactoring leaves every method's result unchanged (the closing note of issue #11: wanda 50%,
sparsegpt 2:4, flap 20% and seap-gen 20% on SmolLM2, before and after the observe → decide → realize seam).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def digest(folder: str | Path) -> str:
    from safetensors.torch import load_file

    h = hashlib.sha256()
    state = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        if shard.name != "statistics.safetensors":
            state.update(load_file(str(shard)))
    for key in sorted(state):
        t = state[key].contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        print(folder, digest(folder))
