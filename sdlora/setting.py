"""What a setting is: its one declaration (`setting(...)` on a config dataclass field, read back as a
`Setting`) and the check of a value against it. The settings themselves are declared in `sdlora.config`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A setting has a value that is not allowed."""


@dataclass(frozen=True)
class Setting:
    """One setting: everything the front ends and the validation need to know about it."""
    name: str                      # the dataclass field
    owner: str                     # "data" | "lora" | "train"
    kind: type                     # int, float, str, bool, or tuple (Python API only)
    default: Any
    help: str                      # one line, shown by --help and under the web UI's control
    label: str                     # the web UI's label
    ui: str                        # "basic" | "advanced" | "managed" (the web UI sets it itself) | "" (API only)
    flag: str                      # the CLI flag; "" when the CLI has none
    low: float | None = None
    high: float | None = None
    low_open: bool = False         # low itself is not allowed
    choices: tuple = ()
    optional: bool = False         # None is allowed (means: derived, or off; the help says which)
    derived: bool = False          # None is worked out by training.plan.suggested

    def check(self, value: Any) -> None:
        """Raise ConfigError unless `value` is allowed for this setting."""
        if value is None and self.optional:
            return
        if self.choices:
            if value not in self.choices:
                raise refused(self.name, value, "use one of " + ", ".join(map(str, self.choices)))
        elif self.kind is bool:
            if not isinstance(value, bool):
                raise refused(self.name, value, "use true or false")
        elif self.kind is int:
            check_whole(self.name, value, int(self.low if self.low is not None else -2**63),
                 None if self.high is None else int(self.high))
        elif self.kind is float:
            check_number(self.name, value, self.low, self.high, self.low_open)
        elif self.kind is str and not isinstance(value, str):
            raise refused(self.name, value, "use text")


def setting(default: Any, help: str, *, label: str = "", ui: str = "advanced", flag: str | None = None,
            kind: type | None = None, **limits: Any) -> Any:
    """A dataclass field declared with its Setting (the name and owner are filled in by `settings`)."""
    kind = kind or (type(default) if default is not None else float)
    meta = dict(default=default, help=help, label=label, ui=ui, flag=flag, kind=kind, **limits)
    return field(default=default, metadata={"setting": meta})


def refused(field_name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{field_name}={value!r} is not allowed: {allowed}")


def check_number(name: str, value: float, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise refused(name, value, "use a finite number")
    if low is not None and (value <= low if low_open else value < low):
        raise refused(name, value, f"use a number {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise refused(name, value, f"use a number <= {high}")


def check_whole(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise refused(name, value, "use a whole number")
    if value < low or (high is not None and value > high):
        raise refused(name, value, f"use a whole number from {low}" + (f" to {high}" if high else " up"))


__all__ = ["ConfigError", "Setting", "setting", "refused", "check_number", "check_whole"]
