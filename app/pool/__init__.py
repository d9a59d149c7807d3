from app.pool.policies import LeastOutstandingWork, RoutingPolicy
from app.pool.pool import Lease, Member, Pool, State

__all__ = ["Lease", "LeastOutstandingWork", "Member", "Pool", "RoutingPolicy", "State"]
