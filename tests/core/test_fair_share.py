"""Fair share: free slots go round-robin across teams, within each team's running limit."""

from __future__ import annotations

from collections import deque

from core.fair_share import TeamQueue, fair_order


def test_the_team_with_fewer_jobs_in_flight_goes_first_then_round_robin():
    teams = {"a": TeamQueue(deque([1, 2, 3]), in_flight=1, last_served=10.0), "b": TeamQueue(deque([4]))}
    assert fair_order(teams, 3, served_at=20.0) == [4, 1, 2]


def test_ties_go_to_the_team_served_longest_ago():
    teams = {"a": TeamQueue(deque([1]), last_served=10.0), "b": TeamQueue(deque([2]), last_served=5.0)}
    assert fair_order(teams, 1, served_at=20.0) == [2]


def test_running_limits_hold_and_free_slots_can_stay_free():
    teams = {"a": TeamQueue(deque([1, 2]), in_flight=1, max_running=2), "b": TeamQueue(deque([3]), max_running=0)}
    assert fair_order(teams, 5, served_at=1.0) == [3, 1]


def test_nothing_waits_or_nothing_is_free():
    assert fair_order({}, 4, served_at=1.0) == []
    assert fair_order({"a": TeamQueue(deque([1]))}, 0, served_at=1.0) == []
