"""Condition knowledge (``assets/conditions.yaml``): loaded once, validated against the class catalogue at start-up.

The web app refuses to start when a catalogue class has no entry, so a class added to `dermsight.domain.classes` cannot
reach users without an explanation. Display names are not stored in the file: they come from the catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dermsight.domain.classes import CONDITIONS, Condition

KNOWLEDGE_PATH = Path(__file__).resolve().parents[1] / "assets" / "conditions.yaml"
URGENCIES = ("urgent", "soon", "routine")
SECTIONS = ("what_it_is", "symptoms", "causes", "treatment")


class KnowledgeError(ValueError):
    """The knowledge file is missing an entry or a field; the message names which."""


@dataclass(frozen=True)
class Source:
    name: str
    url: str


@dataclass(frozen=True)
class ConditionInfo:
    code: str
    condition: Condition  # the catalogue entry: name and malignancy
    codes: tuple[str, ...]  # every catalogue code sharing this entry (e.g. "mel" and "MEL")
    also_known_as: tuple[str, ...]
    urgency: str
    summary: str
    what_it_is: tuple[str, ...]
    symptoms: tuple[str, ...]
    causes: tuple[str, ...]  # causes and risk factors
    treatment: tuple[str, ...]
    see_a_doctor: str
    sources: tuple[Source, ...]

    @property
    def name(self) -> str:
        return self.condition.name

    def to_dict(self, brief: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "code": self.code,
            "name": self.name,
            "malignancy": str(self.condition.malignancy),
            "urgency": self.urgency,
            "summary": self.summary,
        }
        if brief:
            return d
        d.update(
            same_condition_codes=list(self.codes),
            also_known_as=list(self.also_known_as),
            what_it_is=list(self.what_it_is),
            symptoms=list(self.symptoms),
            causes_and_risk_factors=list(self.causes),
            treatment=list(self.treatment),
            see_a_doctor=self.see_a_doctor,
            sources=[{"name": s.name, "url": s.url} for s in self.sources],
        )
        return d


@dataclass(frozen=True)
class Knowledge:
    conditions: dict[str, ConditionInfo]  # every catalogue code, in catalogue order
    photo_tips: tuple[str, ...]

    def __getitem__(self, code: str) -> ConditionInfo:
        return self.conditions[code]

    def get(self, code: str) -> ConditionInfo | None:
        """The condition with this code; else, ignoring case, the one condition the code can mean (HAM's codes are
        lower case and ISIC 2019's upper case: ``scc`` can only mean ``SCC``, and ``Mel`` either ``mel`` or ``MEL``,
        which describe the same condition; the first in catalogue order is returned)."""
        if code in self.conditions:
            return self.conditions[code]
        alike = [info for c, info in self.conditions.items() if c.lower() == code.lower()]
        return alike[0] if alike and len({info.codes for info in alike}) == 1 else None


def _text(entry: dict, key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise KnowledgeError(f"{where}: '{key}' must be non-empty text")
    return " ".join(value.split())


def _texts(entry: dict, key: str, where: str, allow_empty: bool = False) -> tuple[str, ...]:
    value = entry.get(key, [] if allow_empty else None)
    if not isinstance(value, list) or (not value and not allow_empty):
        raise KnowledgeError(f"{where}: '{key}' must be a non-empty list of text")
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise KnowledgeError(f"{where}: every item of '{key}' must be non-empty text")
    return tuple(" ".join(v.split()) for v in value)


def parse_knowledge(data: Any, catalogue: dict[str, Condition] | None = None) -> Knowledge:
    """Validate the parsed YAML against ``catalogue`` (default: the class catalogue) and build `Knowledge`."""
    catalogue = CONDITIONS if catalogue is None else catalogue
    if not isinstance(data, dict) or not isinstance(data.get("conditions"), list):
        raise KnowledgeError("knowledge file must be a mapping with a 'conditions' list")
    tips = _texts(data, "photo_tips", "knowledge file")
    by_code: dict[str, ConditionInfo] = {}
    for i, entry in enumerate(data["conditions"]):
        where = f"conditions[{i}]"
        if not isinstance(entry, dict):
            raise KnowledgeError(f"{where} must be a mapping")
        codes = entry.get("codes")
        if not isinstance(codes, list) or not codes or not all(isinstance(c, str) for c in codes):
            raise KnowledgeError(f"{where}: 'codes' must be a non-empty list of catalogue codes")
        where = f"conditions[{i}] ({', '.join(codes)})"
        unknown = [c for c in codes if c not in catalogue]
        if unknown:
            raise KnowledgeError(f"{where}: {', '.join(unknown)} not in the class catalogue (dermsight.domain.classes)")
        urgency = entry.get("urgency")
        if urgency not in URGENCIES:
            raise KnowledgeError(f"{where}: 'urgency' must be one of {', '.join(URGENCIES)}")
        sources = entry.get("sources")
        if not isinstance(sources, list) or not sources:
            raise KnowledgeError(f"{where}: at least one source is required")
        parsed_sources = []
        for s in sources:
            if not isinstance(s, dict) or not str(s.get("name", "")).strip():
                raise KnowledgeError(f"{where}: every source needs a name and an https url")
            if not str(s.get("url", "")).startswith("https://"):
                raise KnowledgeError(f"{where}: source {s.get('name')!r} needs an https url")
            parsed_sources.append(Source(str(s["name"]).strip(), str(s["url"]).strip()))
        fields = {key: _texts(entry, key, where) for key in SECTIONS}
        for code in codes:
            if code in by_code:
                raise KnowledgeError(f"{where}: {code} already has an entry")
            by_code[code] = ConditionInfo(
                code=code,
                condition=catalogue[code],
                codes=tuple(codes),
                also_known_as=_texts(entry, "also_known_as", where, allow_empty=True),
                urgency=urgency,
                summary=_text(entry, "summary", where),
                see_a_doctor=_text(entry, "see_a_doctor", where),
                sources=tuple(parsed_sources),
                **fields,
            )
    missing = [c for c in catalogue if c not in by_code]
    if missing:
        raise KnowledgeError(
            f"no knowledge entry for catalogue class(es) {', '.join(missing)}: add them to the knowledge file"
        )
    return Knowledge({c: by_code[c] for c in catalogue}, tips)


def load_knowledge(path: str | Path | None = None) -> Knowledge:
    """Read and validate the knowledge file (default: the bundled ``assets/conditions.yaml``)."""
    path = Path(path) if path is not None else KNOWLEDGE_PATH
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise KnowledgeError(f"cannot read knowledge file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise KnowledgeError(f"knowledge file {path} is not valid YAML: {e}") from None
    try:
        return parse_knowledge(data)
    except KnowledgeError as e:
        raise KnowledgeError(f"{path}: {e}") from None
