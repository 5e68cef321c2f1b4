"""The mechanism every seam into a library we stand on uses (vLLM: `atlas_rl.backends.
vllm.hooks`; TRL: `atlas_rl.integrations.trl`; accelerate and DeepSpeed:
`atlas_rl.compat.deepspeed`): each assignment into a foreign object goes through
`Seam.patch`, `Seam.retype` or `Seam.assign`, under the key of a row of the seam's table,
and what each hook did in this process is in `Seam.status`. ``ATLAS_RL_COMPAT=off``
(`compat_enabled`, read here only) switches every workaround and speed change off."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

#: Attribute carried by every replacement atlas-rl installs: the hook's key.
MARK = "__atlas_hook__"
#: The environment switch of the workarounds and speed changes.
COMPAT_ENV = "ATLAS_RL_COMPAT"


def compat_enabled() -> bool:
    """False with ``ATLAS_RL_COMPAT=off`` (or 0/false/no)."""
    return os.environ.get(COMPAT_ENV, "on").strip().lower() not in {"0", "off", "false", "no"}


@dataclass(frozen=True)
class Hook:
    key: str
    target: str
    kind: str        # e.g. "workaround" | "atlas" | "measurement" | "rollback" | "wiring"
    scope: str
    why: str
    when_fixed: str  # what happens when the library changes or fixes the code underneath


def minor_version(module: Any) -> tuple[int, int]:
    """(major, minor) of a library module's ``__version__``; (0, 0) if unreadable."""
    parts = str(getattr(module, "__version__", "")).split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return (0, 0)


def hook_of(obj: Any) -> str | None:
    """The key of the atlas-rl hook `obj` is (a function, bound method or classmethod)."""
    return getattr(getattr(obj, "__func__", obj), MARK, None)


class Seam:
    def __init__(self, library: str, hooks: tuple[Hook, ...]):
        self.library = library
        self.hooks = hooks
        self.keys = tuple(h.key for h in hooks)
        self._status: dict[str, str] = {}

    def _check(self, key: str) -> None:
        if key not in self.keys:
            raise KeyError(f"{key!r} is not a hook in the {self.library} seam's table: add a "
                           f"row to it first")

    def record(self, key: str, state: str) -> str:
        """What a hook did in this process ('applied', 'not needed: ...', 'off ...')."""
        self._check(key)
        self._status[key] = state
        return state

    def status(self) -> dict[str, str]:
        return dict(self._status)

    def patch(self, owner: Any, name: str, replacement: Callable, *, key: str) -> bool:
        """``owner.name = replacement``, marked with the hook's `key`; False (and nothing
        changed) if that hook is already there."""
        self._check(key)
        if hook_of(getattr(owner, name, None)) == key:
            return False
        setattr(getattr(replacement, "__func__", replacement), MARK, key)
        setattr(owner, name, replacement)
        return True

    def retype(self, obj: Any, cls: type, *, key: str) -> bool:
        """Give `obj` the class `cls`, a subclass of its own that adds behaviour (its data
        attributes are set with `assign`)."""
        self._check(key)
        if isinstance(obj, cls):
            return False
        if not issubclass(cls, type(obj)):
            raise TypeError(f"{cls.__name__} is not a subclass of {type(obj).__name__}")
        obj.__class__ = cls
        return True

    def assign(self, obj: Any, values: dict[str, Any], *, key: str) -> None:
        """Set data attributes of a foreign object (e.g. its own protocol's fields)."""
        self._check(key)
        for name, value in values.items():
            setattr(obj, name, value)

    def describe(self) -> list[dict[str, str]]:
        """The table with this process's status per hook."""
        return [{"key": h.key, "kind": h.kind, "scope": h.scope, "target": h.target,
                 "why": h.why, "when_fixed": h.when_fixed,
                 "status": self._status.get(h.key, "not installed in this process")}
                for h in self.hooks]
