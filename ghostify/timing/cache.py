"""The timing database on disk: one JSON file per environment, entries keyed by layer form,
input shape, dtype and layout, in milliseconds.

The folder is ``$GHOSTIFY_TIMING_CACHE`` when set, else ``$XDG_CACHE_HOME/ghostify/timing``
(``~/.cache/ghostify/timing``). Files are written whole to a temporary name and renamed, so a
reader never sees half a file; two processes writing at once lose at worst the other's newest
entries (they are measured again). A file that cannot be read is ignored with a warning, and
replaced on the next write.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .environment import environment_id

ENV_VAR = "GHOSTIFY_TIMING_CACHE"
SCHEMA = "ghostify.timing/1"


def default_folder() -> Path:
    """Where timings are cached unless told otherwise (see the module docstring)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ghostify" / "timing"


class TimingCache:
    """Timings on disk under ``folder`` (default: ``default_folder()``), read once per
    environment and kept in memory; ``enabled=False`` keeps them in memory only."""

    def __init__(self, folder: str | Path | None = None, *, enabled: bool = True) -> None:
        if folder is not None and not isinstance(folder, (str, Path)):
            raise ConfigError(f"the timing cache folder must be a path; got {folder!r}")
        self.folder = Path(folder).expanduser() if folder is not None else default_folder()
        self.enabled = enabled
        self._loaded: dict[str, dict[str, float]] = {}

    def path(self, env: dict[str, Any]) -> Path:
        return self.folder / f"{environment_id(env)}.json"

    def entries(self, env: dict[str, Any]) -> dict[str, float]:
        """Every cached timing of ``env`` (ms by entry key); a live view, do not modify."""
        name = environment_id(env)
        if name not in self._loaded:
            self._loaded[name] = self._read(env) if self.enabled else {}
        return self._loaded[name]

    def get(self, env: dict[str, Any], key: str) -> float | None:
        return self.entries(env).get(key)

    def put(self, env: dict[str, Any], timings: dict[str, float]) -> None:
        """Add ``timings`` (ms by entry key) and write the environment's file."""
        entries = self.entries(env)
        entries.update(timings)
        if self.enabled:
            self._write(env, {**self._read(env, quiet=True), **entries})

    def _read(self, env: dict[str, Any], *, quiet: bool = False) -> dict[str, float]:
        path = self.path(env)
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("schema") != SCHEMA:
                raise ValueError(f"not a {SCHEMA} file")
            if data.get("environment") != env:
                raise ValueError("its environment does not match its name")
            entries = data["entries"]
            if not isinstance(entries, dict) or not all(
                isinstance(v, (int, float)) and v > 0 for v in entries.values()
            ):
                raise ValueError("its entries are not positive milliseconds")
            return {str(k): float(v) for k, v in entries.items()}
        except (OSError, ValueError, KeyError, TypeError) as error:
            if not quiet:
                warnings.warn(
                    f"ignoring the timing cache file {str(path)!r}, which cannot be read "
                    f"({error}); its layers are timed again and the file rewritten",
                    stacklevel=4,
                )
            return {}

    def _write(self, env: dict[str, Any], entries: dict[str, float]) -> None:
        path = self.path(env)
        data = {"schema": SCHEMA, "environment": env, "entries": dict(sorted(entries.items()))}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(data, file, indent=1)
            os.replace(temporary, path)
        except OSError as error:  # a read-only home: keep timing, in memory only
            warnings.warn(
                f"could not write the timing cache {str(path)!r} ({error}); timings are kept "
                "in memory only",
                stacklevel=4,
            )
            self.enabled = False
