"""Decision thresholds: a default, overridable per class name from a YAML or JSON file.

File format (``GENCLIP_THRESHOLDS_FILE``)::

    default: 0.55          # optional, else GENCLIP_DEFAULT_THRESHOLD
    classes:
      bottle: 0.62
      screw: 0.40

Lookup: the class name the client sent, then the class label the model used (after CNF),
then the default. Names match case-insensitively, surrounding spaces ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ThresholdsError(ValueError):
    pass


def _norm(name: str) -> str:
    return " ".join(name.split()).casefold()


def _threshold(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ThresholdsError(f"{where}: threshold must be a number, got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ThresholdsError(f"{where}: threshold {value} outside [0, 1]")
    return value


@dataclass(frozen=True)
class Thresholds:
    default: float = 0.5
    per_class: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Any, default: float, where: str = "thresholds") -> Thresholds:
        if data is None:
            return cls(default=_threshold(default, where))
        if not isinstance(data, dict):
            raise ThresholdsError(f"{where}: expected a mapping with 'default' and 'classes'")
        unknown = set(data) - {"default", "classes"}
        if unknown:
            raise ThresholdsError(f"{where}: unknown keys {sorted(unknown)} (use 'default', 'classes')")
        base = _threshold(data.get("default", default), f"{where}: default")
        classes = data.get("classes") or {}
        if not isinstance(classes, dict):
            raise ThresholdsError(f"{where}: 'classes' must map class names to thresholds")
        per_class = {_norm(str(k)): _threshold(v, f"{where}: classes.{k}") for k, v in classes.items()}
        return cls(default=base, per_class=per_class)

    @classmethod
    def load(cls, path: str | Path | None, default: float = 0.5) -> Thresholds:
        if path is None:
            return cls(default=_threshold(default, "default_threshold"))
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ThresholdsError(f"cannot read thresholds file {path}: {exc}") from exc
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:
            raise ThresholdsError(f"cannot parse thresholds file {path}: {exc}") from exc
        return cls.from_mapping(data, default, where=str(path))

    def for_class(self, class_name: str | None, class_label: str | None = None) -> float:
        return self.lookup(class_name, class_label)[0]

    def lookup(self, class_name: str | None, class_label: str | None = None) -> tuple[float, str]:
        """``(threshold, source)``: source ``class`` (a per-class entry matched) or ``default``."""
        for name in (class_name, class_label):
            if name:
                value = self.per_class.get(_norm(name))
                if value is not None:
                    return value, "class"
        return self.default, "default"
