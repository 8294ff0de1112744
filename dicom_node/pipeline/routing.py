"""Routing: which received photos are parsed, and where their results go.

Rules are tried in order and the first that matches wins; a photo no rule takes is kept (it was
acknowledged) and its job ends ``done`` with a note saying no rule matched. A rule matches on the
calling AE title and on header attributes (shell patterns, case-insensitive, e.g.
``Modality = ["XC"]``, ``BodyPartExamined = ["*SKIN*", "WHOLEBODY"]``). Results go to named
destinations, or with ``@sender`` back to the destination configured for the calling AE.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_node.config import SENDER, Peers, RoutingRule


class RoutingError(ValueError):
    """A rule matched but its destinations cannot be resolved (configuration changed since receipt)."""


@dataclass(frozen=True)
class Route:
    rule: str
    process: bool
    destinations: tuple[str, ...]


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None:
        return [""]
    if isinstance(value, (list, MultiValue)):
        return [str(v).strip() for v in value] or [""]
    return [str(value).strip()]


def _rule_matches(rule: RoutingRule, ds: Dataset, calling_ae: str) -> bool:
    if rule.calling_ae_titles and calling_ae not in rule.calling_ae_titles:
        return False
    for keyword, patterns in rule.match.items():
        values = [v.upper() for v in _values(ds, keyword)]
        if not any(fnmatch.fnmatchcase(v, p.upper()) for v in values for p in patterns):
            return False
    return True


class Router:
    """Applies ``routing.rules``; ``peers`` resolves '@sender' to the calling AE's destination."""

    def __init__(self, rules: Sequence[RoutingRule], peers: Peers) -> None:
        self.rules = tuple(rules)
        self.peers = peers

    def route(self, ds: Dataset, calling_ae: str, calling_host: str | None) -> Route | None:
        """The first rule taking this photo, with destination names resolved; None when no rule does."""
        for rule in self.rules:
            if not _rule_matches(rule, ds, calling_ae):
                continue
            if not rule.process:
                return Route(rule.name, False, ())
            destinations: list[str] = []
            for target in rule.send_to:
                name = self._sender(calling_ae, calling_host, rule.name) if target == SENDER else target
                if name not in destinations:
                    destinations.append(name)
            return Route(rule.name, True, tuple(destinations))
        return None

    def _sender(self, calling_ae: str, calling_host: str | None, rule: str) -> str:
        caller = self.peers.caller(calling_ae, calling_host)
        destination = self.peers.sender_destination(caller) if caller else None
        if destination is None:
            raise RoutingError(
                f"rule {rule!r} sends results back to the sender, but {calling_ae} has no destination in the "
                "current configuration (callers[].return_to)"
            )
        return destination.name
