"""Search a device view for secret tensors by content: their bytes in any common precision, anywhere in any file.

A name-based check misses a tensor that was renamed, reshaped, cast or embedded in a message; a
byte search does not. Probes are short runs of a tensor's non-zero values, so a match is no accident.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

FLOAT_PRECISIONS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
PROBE_VALUES = 8  # consecutive non-zero values per probe


def tensor_probes(tensors: Mapping[str, Tensor], rows_per_tensor: int = 4) -> dict[str, bytes]:
    """Byte strings that would betray each tensor: runs of a few rows' values as float32/64/16, bf16 and int8."""
    probes = {}
    for name, tensor in tensors.items():
        matrix = tensor.detach().reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.detach()[None]
        rows = matrix[matrix.abs().sum(dim=1) > 0]
        for index in range(0, len(rows), max(1, len(rows) // rows_per_tensor)):
            row = rows[index]
            quantized = torch.round(row.double() * 127 / row.abs().max()).to(torch.int8)  # per-row symmetric int8
            # Runs without a zero, so no probe looks like the zero padding every file is full of.
            for values, dtypes in ((row, FLOAT_PRECISIONS), (quantized, (torch.int8,))):
                start = _first_run_without_zero(values)
                if start is None:
                    continue
                for dtype in dtypes:
                    window = values[start : start + PROBE_VALUES].to(dtype)  # contiguous: as it would lie in memory
                    probes[f"{name}[{index}] as {dtype}"] = window.view(torch.uint8).numpy().tobytes()
    return probes


def _first_run_without_zero(values: Tensor) -> int | None:
    if len(values) < PROBE_VALUES:
        return None
    zeros = (values == 0).to(torch.int32).unfold(0, PROBE_VALUES, 1).sum(dim=1)
    clean = torch.nonzero(zeros == 0)
    return int(clean[0]) if len(clean) else None


def find_in_view(directory: str | Path, probes: Mapping[str, bytes]) -> list[tuple[str, str, int]]:
    """Every (probe, file, byte offset) where a probe's bytes occur in a file under `directory`."""
    root = Path(directory)
    return [hit for path in sorted(root.rglob("*")) if path.is_file() for hit in _find(path, root, probes)]


def _find(path: Path, root: Path, probes: Mapping[str, bytes]) -> Iterable[tuple[str, str, int]]:
    data = np.fromfile(path, dtype=np.uint8)
    by_head: dict[int, list[tuple[str, int]]] = {}
    for name, probe in probes.items():
        if len(probe) < 4:
            raise ValueError(f"probe {name!r} is {len(probe)} bytes; 4 or more are needed")
        # Key on the probe's most informative 4 bytes: a float64 made from a float32 starts with zeros.
        at = max(range(len(probe) - 3), key=lambda k: (sum(b != 0 for b in probe[k : k + 4]), -k))
        by_head.setdefault(int(np.frombuffer(probe[at : at + 4], dtype=np.uint32)[0]), []).append((name, at))
    heads = np.array(sorted(by_head), dtype=np.uint32)
    # A table indexed by a word's low 24 bits screens a file in one vectorised gather per alignment;
    # the few words it passes are checked exactly against the heads, then byte by byte.
    screen = np.zeros(1 << 24, dtype=bool)
    screen[heads & 0xFFFFFF] = True
    for alignment in range(4):
        usable = (len(data) - alignment) // 4 * 4
        words = data[alignment : alignment + usable].view(np.uint32)
        candidates = np.flatnonzero(screen[words & 0xFFFFFF])
        for word_index in candidates[np.isin(words[candidates], heads)]:
            for name, at in by_head[int(words[word_index])]:
                offset, probe = alignment + 4 * int(word_index) - at, probes[name]
                if offset >= 0 and data[offset : offset + len(probe)].tobytes() == probe:
                    yield name, str(path.relative_to(root)), offset
