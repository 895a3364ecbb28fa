"""Fair share: which waiting jobs take the free worker slots, round-robin across teams.

A team's turn comes by how few jobs it has in flight, then by how long ago it was last served; within a
team, the oldest job goes first. A team at its running-jobs limit waits. So if team A queues ten jobs
and team B then queues one, B's job takes the next free slot.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass
class TeamQueue:
    """One team's waiting jobs (oldest first) and its standing."""

    waiting: deque[int]
    in_flight: int = 0
    last_served: float = float("-inf")
    max_running: int = 0  # 0: unlimited

    def can_take(self) -> bool:
        """Whether the team may have one more job in flight."""
        return bool(self.waiting) and (not self.max_running or self.in_flight < self.max_running)


def fair_order(teams: dict[str, TeamQueue], free_slots: int, served_at: float) -> list[int]:
    """The waiting items (outbox message ids) to send now, in order, at most `free_slots` of them."""
    chosen: list[int] = []
    while len(chosen) < free_slots:
        ready = [(queue.in_flight, queue.last_served, queue.waiting[0], team)
                 for team, queue in teams.items() if queue.can_take()]
        if not ready:
            break
        *_, team = min(ready)
        queue = teams[team]
        chosen.append(queue.waiting.popleft())
        queue.in_flight += 1
        queue.last_served = served_at
    return chosen
