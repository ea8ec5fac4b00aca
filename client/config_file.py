"""Reading a config file strictly, and showing it safely: one flat YAML document (YAML merge keys and
duplicate keys refused, with their line), `ConfigError` (one "key: problem" line per problem), and
`redact` for what gets written out or printed (secrets of any kind of config)."""
from __future__ import annotations

import re
from typing import Any

REDACTED = "***REDACTED***"

# Keys whose values are secrets (matched on the last word of the key, so `max_new_tokens` is not).
SECRET_KEY_RE = re.compile(
    r"(^|[_\-.])(token|password|passwd|secret|api[_\-]?key|apikey|access[_\-]?key|private[_\-]?key|auth|"
    r"authorization|credentials?|cookie)$", re.IGNORECASE)
_URL_USERINFO_RE = re.compile(r"(\b[a-z][a-z0-9+.\-]*://)[^/@\s]+@", re.IGNORECASE)


class ConfigError(ValueError):
    """A config that cannot be run; `errors` holds one "key: problem" line per problem."""

    def __init__(self, errors: list[str], path: str | None = None):
        self.errors = list(errors)
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(where + ("; ".join(self.errors) if len(self.errors) == 1 else
                                  f"{len(self.errors)} problems:\n  " + "\n  ".join(self.errors)))


def is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and bool(SECRET_KEY_RE.search(key))


def redact(obj: Any) -> Any:
    """A copy with the values of secret-looking keys replaced and URL passwords (`user:pw@`) hidden."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return _URL_USERINFO_RE.sub(lambda m: m.group(1) + REDACTED + "@", obj)
    return obj


def load_yaml(text: str, path: str) -> Any:
    """The YAML document in `text` (read from `path`), or ConfigError."""
    import yaml

    class Loader(yaml.SafeLoader):  # refuses merge keys and duplicate keys, with the line
        pass

    def construct_mapping(loader, node, deep=False):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ConfigError([f"line {line}: YAML merge keys ('<<') are not supported: one flat file, "
                                   "no inheritance"], path)
            key = loader.construct_object(key_node, deep=True)
            if key in out:
                raise ConfigError([f"line {line}: duplicate key {key!r}"], path)
            out[key] = loader.construct_object(value_node, deep=True)
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], path) from None
