"""sbpc: compile a PyTorch model into a distributed program with SBP layouts."""
from compiler.api import CompiledPlan, compile
from cluster import Cluster

__all__ = ["compile", "Cluster", "CompiledPlan"]
