"""Routing: the first matching rule decides whether a photo is parsed and where its results go."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from dicom_node.config import NodeConfig
from dicom_node.pipeline.routing import Route, Router, RoutingError


def photo(**tags: object) -> Dataset:
    ds = Dataset()
    ds.Modality = "XC"
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def router_of(config: NodeConfig) -> Router:
    return Router(config.routing.rules, config.peers)


@pytest.fixture
def router() -> Router:
    return router_of(NodeConfig(
        callers=[
            {"ae_title": "DERMA_PACS", "host": "10.0.0.5", "return_to": "pacs"},
            {"ae_title": "CAMERA"},  # its destination is found by AE title
            {"ae_title": "LAB"},
        ],
        destinations=[
            {"name": "pacs", "ae_title": "DERMA_PACS", "host": "10.0.0.5", "port": 104},
            {"name": "camera", "ae_title": "CAMERA", "host": "10.0.0.9", "port": 104},
            {"name": "archive", "ae_title": "ARCHIVE", "host": "10.0.0.7", "port": 11112},
        ],
        routing={"rules": [
            {"name": "no-faces", "match": {"BodyPartExamined": ["HEAD", "FACE*"]}, "process": False},
            {"name": "lab-to-archive", "calling_ae_titles": ["LAB"], "send_to": ["archive"]},
            {"name": "skin", "calling_ae_titles": ["DERMA_PACS", "CAMERA"],
             "match": {"Modality": ["xc"], "BodyPartExamined": ["*SKIN*", "WHOLEBODY", ""]},
             "send_to": ["@sender", "archive"]},
        ]},
    ))


def test_first_matching_rule_wins_and_sender_resolves(router: Router) -> None:
    assert router.route(photo(BodyPartExamined="WHOLEBODY"), "DERMA_PACS", "10.0.0.5") == \
        Route("skin", True, ("pacs", "archive"))
    assert router.route(photo(BodyPartExamined="WHOLEBODY"), "CAMERA", "10.0.0.9") == \
        Route("skin", True, ("camera", "archive"))
    assert router.route(photo(), "CAMERA", "10.0.0.9").rule == "skin"  # absent attribute reads as ""


def test_calling_ae_selects_a_rule(router: Router) -> None:
    assert router.route(photo(BodyPartExamined="ARM"), "LAB", "10.0.0.8") == Route("lab-to-archive", True,
                                                                                     ("archive",))


def test_a_rule_can_keep_photos_unparsed(router: Router) -> None:
    assert router.route(photo(BodyPartExamined="FACE"), "DERMA_PACS", "10.0.0.5") == Route("no-faces", False, ())


def test_no_rule_means_none(router: Router) -> None:
    assert router.route(photo(BodyPartExamined="ARM"), "DERMA_PACS", "10.0.0.5") is None
    assert router.route(photo(Modality="OT", BodyPartExamined="WHOLEBODY"), "CAMERA", "10.0.0.9") is None


def test_a_sender_no_longer_configured_is_a_routing_error() -> None:
    """A photo received before its sender was removed from the configuration has nowhere to go back to."""
    router = router_of(NodeConfig(
        callers=[{"ae_title": "PACS", "return_to": "pacs"}],
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}],
    ))
    with pytest.raises(RoutingError, match="no destination"):
        router.route(photo(), "REMOVED", "10.0.0.1")


def test_a_caller_whose_results_could_go_nowhere_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match=r"callers\[0\] \(LAB\)"):
        NodeConfig(callers=[{"ae_title": "LAB"}], destinations=[])
