"""Training dynamics: collecting them, storing them, importing and exporting them."""

from gptfluence.dynamics.store import Dynamics, Run, create_store, read_examples, write_examples

__all__ = ["Dynamics", "Run", "create_store", "read_examples", "write_examples"]
