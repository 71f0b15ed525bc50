"""nodeagent: the small daemon every booted node runs.

It tells the config server what the machine is (inventory), proves it is the node that booted
(lookup with a one-time token per boot), keeps reporting (heartbeats) and serves a small local
API. See docs/agent.md.
"""

__version__ = "0.1.0"
