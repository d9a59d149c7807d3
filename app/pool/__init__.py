from app.pool.policies import POLICIES, LeastOutstandingWork, PowerOfTwoLeastWork, RoutingPolicy
from app.pool.pool import Breaker, Lease, Member, Pool, State

__all__ = [
    "POLICIES",
    "Breaker",
    "Lease",
    "LeastOutstandingWork",
    "Member",
    "Pool",
    "PowerOfTwoLeastWork",
    "RoutingPolicy",
    "State",
]
