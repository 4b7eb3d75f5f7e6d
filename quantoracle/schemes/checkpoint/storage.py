"""The tensors of a directory of safetensors files, read lazily."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from quantoracle.errors import CheckpointFormatError
from quantoracle.schemes.checkpoint.detect import read_json

INDEX = "model.safetensors.index.json"


class SafetensorsDirectory(Mapping[str, torch.Tensor]):
    """Tensor name -> tensor over ``model.safetensors.index.json``'s weight map, or, without an
    index, over every ``*.safetensors`` file of the directory.

    ``self[name]`` reads a whole tensor; :meth:`read` reads a slice of it from disk and nothing
    else; :meth:`header` gives dtype and shape without reading data. Files are opened once and
    kept open until :meth:`close`. Raises CheckpointFormatError for a malformed index, a file it
    names that is missing or unreadable, or a tensor in two files.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._handles: dict[str, object] = {}
        index = self.directory / INDEX
        if index.is_file():
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise CheckpointFormatError(f'{index}: expected {{"weight_map": {{tensor: file}}}}')
            self._files: dict[str, str] = dict(weight_map)
            return
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise CheckpointFormatError(f"{self.directory}: no {INDEX} and no *.safetensors files")
        self._files = {}
        for file in files:
            for name in self._handle(file.name).keys():
                if name in self._files:
                    raise CheckpointFormatError(
                        f"{self.directory}: tensor {name} is in both {self._files[name]} and "
                        f"{file.name}; remove the stale file"
                    )
                self._files[name] = file.name

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


__all__ = ["SafetensorsDirectory", "INDEX"]
