"""Prompt profiles: data files (YAML) that give each mission its system and user text.

A profile file has `system` and `user` (the texts for every mission) and optionally `missions`,
a map from mission name to its focus text (a string) or to `{focus, system, user}` overrides.
`{mission}` in a text becomes the mission's focus text (the mission name when it has none). Plain
substitution, not `str.format`: the texts are full of JSON-like braces.

Packaged profiles live in `coordexp/group/profiles/NAME.yaml`; a path to any other file works too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

PROFILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")
DEFAULT_PROFILE = "summary"
_TOP_KEYS = {"name", "description", "system", "user", "missions"}
_MISSION_KEYS = {"focus", "system", "user"}


class ProfileError(ValueError):
    """A profile file that cannot be used (the message names the file and the problem)."""


@dataclass(frozen=True)
class MissionPrompt:
    """The rendered texts for one mission."""

    mission: str
    system: str
    user: str
    profile: str

    def served_user_text(self) -> str:
        """What a served model gets as its user text: the served ensemble's system prompt is fixed at
        export and it takes only `text_input`, so the mission's whole instruction goes there."""
        return f"{self.system.strip()}\n\n{self.user.strip()}" if self.system.strip() else self.user.strip()


@dataclass(frozen=True)
class Profile:
    name: str
    path: str
    system: str
    user: str
    missions: dict[str, dict[str, str]]

    def for_mission(self, mission: str) -> MissionPrompt:
        entry = self.missions.get(mission, {})
        focus = entry.get("focus", mission)
        system = entry.get("system", self.system).replace("{mission}", focus)
        user = entry.get("user", self.user).replace("{mission}", focus)
        return MissionPrompt(mission=mission, system=system, user=user, profile=self.name)


def available_profiles() -> list[str]:
    return sorted(os.path.splitext(f)[0] for f in os.listdir(PROFILE_DIR) if f.endswith((".yaml", ".yml")))


def _resolve(name_or_path: str) -> str:
    if os.path.isfile(name_or_path):
        return name_or_path
    for ext in (".yaml", ".yml"):
        p = os.path.join(PROFILE_DIR, name_or_path + ext)
        if os.path.isfile(p):
            return p
    raise ProfileError(f"prompt profile {name_or_path!r} not found: not a file, and not one of the packaged "
                       f"profiles ({', '.join(available_profiles())})")


def _text(data: dict[str, Any], key: str, where: str) -> str:
    v = data.get(key)
    if not isinstance(v, str) or not v.strip():
        raise ProfileError(f"{where}: {key!r} must be a non-empty text")
    return v


def _missions(raw: Any, path: str) -> dict[str, dict[str, str]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: 'missions' must map mission names to a focus text or to {{focus, system, user}}")
    out: dict[str, dict[str, str]] = {}
    for name, v in raw.items():
        where = f"{path}: missions.{name}"
        if isinstance(v, str):
            v = {"focus": v}
        if not isinstance(v, dict):
            raise ProfileError(f"{where} must be a focus text or a mapping")
        extra = set(v) - _MISSION_KEYS
        if extra:
            raise ProfileError(f"{where}: unknown keys {sorted(extra)} (allowed: {sorted(_MISSION_KEYS)})")
        out[str(name)] = {k: _text(v, k, where) for k in v}
    return out


def load_profile(name_or_path: str = DEFAULT_PROFILE) -> Profile:
    """A packaged profile by name, or a profile file by path; ProfileError names the problem."""
    import yaml

    path = _resolve(name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping with 'system' and 'user'")
    extra = set(data) - _TOP_KEYS
    if extra:
        raise ProfileError(f"{path}: unknown keys {sorted(extra)} (allowed: {sorted(_TOP_KEYS)})")
    return Profile(name=str(data.get("name") or os.path.splitext(os.path.basename(path))[0]), path=path,
                   system=_text(data, "system", path), user=_text(data, "user", path),
                   missions=_missions(data.get("missions"), path))
