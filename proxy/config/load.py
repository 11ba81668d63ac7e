"""Reading the configuration: which file, and every error as a sentence naming key and source."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .settings import Settings, default_config_path, toml_path
from .values import ConfigError

ENV_CONFIG = "MAILPROXY_CONFIG"


def _describe(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


# MAILPROXY_ variables that are not settings: the file to read, and those the [notify] command
# gets (a hook that runs mailproxy itself passes them on).
_ENV_NOT_SETTINGS = {"MAILPROXY_CONFIG", "MAILPROXY_ACCOUNT", "MAILPROXY_EVENT",
                     "MAILPROXY_REASON", "MAILPROXY_TIME", "MAILPROXY_DEADLINE"}


def _env_source(loc: tuple[int | str, ...]) -> str | None:
    """The environment variable that set the value at ``loc``, if one did."""
    names = [p for p in loc if isinstance(p, str)][:2]
    env = {k.upper() for k in os.environ}
    for n in range(len(names), 0, -1):
        name = "MAILPROXY_" + "__".join(names[:n]).upper()
        if name in env:
            return name
    return None


def unknown_env_variables(settings: Settings) -> list[str]:
    """``MAILPROXY_*`` variables that set nothing (misspelt?), except the ones that name a
    master key (``env:`` sources) and those that are not settings."""
    known = set(_ENV_NOT_SETTINGS)
    for name, info in Settings.model_fields.items():
        top = f"MAILPROXY_{name.upper()}"
        known.add(top)
        model = info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            known.update(f"{top}__{sub.upper()}" for sub in model.model_fields)
    master = settings.vault.master_key or ""
    if master.startswith("env:"):
        known.add(master[4:].upper())
    return sorted(k for k in os.environ
                  if k.upper().startswith("MAILPROXY_") and k.upper() not in known)


def _format_errors(exc: ValidationError, data: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(err["loc"])
        source = _env_source(loc)
        if source is not None:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {_describe(loc)}: {msg} (set by the environment variable {source})")
            continue
        if loc and loc[0] in ("accounts", "devices") and len(loc) > 1 \
                and isinstance(loc[1], int):
            what, field = ("account", "address") if loc[0] == "accounts" else ("device", "name")
            try:
                name = data[loc[0]][loc[1]].get(field)
            except (KeyError, IndexError, AttributeError, TypeError):
                name = None
            if name:
                loc = loc[:2] + tuple(p for p in loc[2:] if p not in ("function-after",))
                prefix = f"{_describe(loc)} ({what} {name!r})"
            else:
                prefix = _describe(loc)
        else:
            prefix = _describe(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        lines.append(f"  {prefix}: {msg}")
    return "\n".join(lines)


def resolve_config_path(explicit: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """The file to read and whether the user named it (a named file must exist)."""
    if explicit is not None:
        return Path(explicit).expanduser(), True
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG]).expanduser(), True
    return default_config_path(), False


def load_config(explicit: str | os.PathLike[str] | None = None) -> tuple[Settings, Path | None]:
    """Load the settings; returns them and the file read (None: built-in defaults)."""
    path, named = resolve_config_path(explicit)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        used: Path | None = path
    elif named:
        raise ConfigError(f"{path}: no such file")
    else:
        used = None
    token = toml_path.set(used)
    try:
        settings = Settings()
    except ValidationError as exc:
        where = str(used) if used else "configuration (environment)"
        details = _format_errors(exc, data)
        if used and all("(set by the environment variable" in x for x in details.splitlines()):
            where = "configuration (environment)"  # the file is not to blame
        raise ConfigError(f"{where}: invalid configuration:\n{details}") from None
    finally:
        toml_path.reset(token)
    return settings, used
