"""Load a TOML config into the pydantic model of the code it configures, with errors that name
the file and the key (``configs/default.toml: rounds.statistics: Input should be ...``)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


def load_config(path: str | Path | None, model: type[M], overrides: dict[str, Any] | None = None) -> M:
    """``model`` validated from the TOML at ``path`` (or defaults when None), then ``overrides``
    (dotted keys, None values ignored) on top."""
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{where}: not valid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [f"{where}: {'.'.join(str(x) for x in err['loc']) or '(top)'}: {err['msg']}"
                 for err in e.errors()]
        raise ConfigError("invalid config\n  " + "\n  ".join(lines)) from None
