"""Which project channels an event goes to: the pure predicates."""

import pytest

from handlers.notification_channels import filter_matches, subscribed

PAYLOAD = {"agent_id": "a1", "user_id": "u1", "check_type": "reminder", "score": 85}


@pytest.mark.parametrize(
    ("channel_filter", "matches"),
    [
        (None, True),
        ({}, True),
        ({"agents": ["a1", "a2"]}, True),
        ({"agents": ["a2"]}, False),
        ({"users": ["u1"], "check_types": ["reminder"]}, True),
        ({"check_types": ["digest"]}, False),
        ({"min_score": 80}, True),
        ({"min_score": 90}, False),
        ({"min_score": True}, True),  # a bool is not a score threshold: ignored
        ({"unknown": 1}, True),
    ],
    ids=str,
)
def test_filter_matches(channel_filter, matches):
    """Every known key of the filter must hold; unknown keys are ignored."""
    assert filter_matches(channel_filter, PAYLOAD) is matches


def test_a_missing_or_non_finite_score_never_meets_a_minimum():
    """min_score needs a finite number in the payload."""
    assert not filter_matches({"min_score": 1}, {})
    assert not filter_matches({"min_score": 1}, {"score": float("nan")})
    assert not filter_matches({"min_score": 1}, {"score": "99"})


def test_an_empty_event_list_subscribes_to_everything():
    """No events listed means every event type."""
    assert subscribed([], "anything")
    assert subscribed(["a", "b"], "b")
    assert not subscribed(["a"], "b")
