"""The tensors of a directory of safetensors files, read lazily."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from quantoracle.errors import CheckpointFormatError
from quantoracle.schemes.checkpoint.detect import read_json

INDEX = "model.safetensors.index.json"
MODEL_FILE = re.compile(r"model(?:-(?P<shard>\d+)-of-(?P<shards>\d+))?\.safetensors")
"""The model's own files, as transformers names them: ``model.safetensors`` or
``model-00001-of-00003.safetensors``."""


def _hub_blob(root: Path, target: Path) -> bool:
    """Whether ``target`` is a blob of the Hugging Face cache snapshot ``root``: the cache keeps
    a snapshot's files as links ``models--org--name/snapshots/<revision>/<file>`` ->
    ``models--org--name/blobs/<hash>``."""
    return root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"


class SafetensorsDirectory(Mapping[str, torch.Tensor]):
    """Tensor name -> tensor over ``model.safetensors.index.json``'s weight map, or, without an
    index, over the model's own files (:data:`MODEL_FILE`: ``model.safetensors`` or a complete
    set of ``model-XXXXX-of-YYYYY.safetensors``). Other ``*.safetensors`` files are not read;
    ``ignored`` names them.

    Every file read must lie inside the directory once ``..`` and symbolic links are resolved
    (a Hugging Face cache snapshot's links to its own blobs count as inside), unless
    ``allow_outside_paths=True``: an index must not make a reader open arbitrary files.

    ``self[name]`` reads a whole tensor; :meth:`read` reads a slice of it from disk and nothing
    else; :meth:`header` gives dtype and shape without reading data. Files are opened once and
    kept open until :meth:`close`. Raises CheckpointFormatError for a malformed index, a file it
    names that is missing, unreadable or outside the directory, no model file or an incomplete
    set of shards without an index, or a tensor in two files.
    """

    def __init__(self, directory: str | Path, allow_outside_paths: bool = False):
        self.directory = Path(directory)
        self.allow_outside_paths = allow_outside_paths
        self._handles: dict[str, object] = {}
        index = self.directory / INDEX
        present = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if index.is_file():
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise CheckpointFormatError(f'{index}: expected {{"weight_map": {{tensor: file}}}}')
            self._files: dict[str, str] = dict(weight_map)
            first_tensor: dict[str, str] = {}
            for tensor, file in weight_map.items():
                first_tensor.setdefault(file, tensor)
            for file, tensor in first_tensor.items():
                self._check_inside(file, f"{index}: weight_map entry {tensor!r}: {file!r}")
            self.ignored = tuple(f for f in present if f not in set(weight_map.values()))
            return
        files = [f for f in present if MODEL_FILE.fullmatch(f)]
        self.ignored = tuple(f for f in present if f not in files)
        if not files:
            found = f"; found {', '.join(self.ignored)}, which are not" if self.ignored else ""
            raise CheckpointFormatError(
                f"{self.directory}: no {INDEX} and no model.safetensors or "
                f"model-XXXXX-of-YYYYY.safetensors{found} (other files are never merged into a "
                "model); rename the model's file or add an index"
            )
        self._files = {}
        for file in files:
            self._check_inside(file, f"{self.directory / file}")
            for name in self._handle(file).keys():
                if name in self._files:
                    raise CheckpointFormatError(
                        f"{self.directory}: tensor {name} is in both {self._files[name]} and "
                        f"{file}; remove the stale file"
                    )
                self._files[name] = file
        self._check_complete(files)

    def _check_complete(self, files: list[str]) -> None:
        """Without an index, shards ``model-i-of-n`` must be all of 1..n, and alone."""
        shards = [MODEL_FILE.fullmatch(f) for f in files]
        counts = {int(m["shards"]) if m["shards"] else None for m in shards}
        numbers = sorted(int(m["shard"]) for m in shards if m["shard"])
        if len(counts) > 1 or (numbers and numbers != list(range(1, int(counts.pop()) + 1))):
            raise CheckpointFormatError(
                f"{self.directory}: no {INDEX}, and the model files {files} are not one complete "
                "set model-00001-of-N .. model-N-of-N; restore the missing shards or the index"
            )

    def _check_inside(self, file: str, what: str) -> None:
        if self.allow_outside_paths:
            return
        root = self.directory.resolve()
        target = (self.directory / file).resolve()
        if not target.is_relative_to(root) and not _hub_blob(root, target):
            raise CheckpointFormatError(
                f"{what} resolves to {target}, outside the checkpoint directory {root}; move the "
                "file into the directory, or pass allow_outside_paths=True if you trust where "
                "it points"
            )

    def _handle(self, file: str):
        if file not in self._handles:
            path = self.directory / file
            if not path.is_file():
                raise CheckpointFormatError(
                    f"{self.directory / INDEX}: names {file}, which does not exist"
                )
            try:
                self._handles[file] = safe_open(str(path), framework="pt")
            except Exception as error:  # safetensors raises untyped errors for corrupt headers
                raise CheckpointFormatError(
                    f"{path}: not a readable safetensors file ({error})"
                ) from None
        return self._handles[file]

    def __repr__(self) -> str:
        files = len(set(self._files.values()))
        return f"SafetensorsDirectory({str(self.directory)!r}, {len(self)} tensors in {files} files)"

    def where(self, name: str) -> str:
        """``<file>: tensor <name>``, for error messages."""
        return f"{self.directory / self._files.get(name, '?')}: tensor {name}"

    def header(self, name: str) -> tuple[str, list[int]]:
        """(safetensors dtype: "U8", "F8_E4M3", "F32", "BF16", ...; shape), reading no data."""
        found = self._handle(self._files[name]).get_slice(name)
        return found.get_dtype(), list(found.get_shape())

    def read(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """Tensor ``name``, or only ``index`` (one slice per leading dim) of it, read from disk."""
        return self._handle(self._files[name]).get_slice(name)[index or ...]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise KeyError(name)
        return self.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        self._handles.clear()


__all__ = ["SafetensorsDirectory", "INDEX", "MODEL_FILE"]
