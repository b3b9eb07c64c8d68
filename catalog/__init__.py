"""loracat catalog: identity, pack format, tiered storage, index, gRPC service, client and CLI.

Nothing under ``catalog`` imports torch: the catalog moves bytes, the engine plugin moves tensors.
"""

__version__ = "0.1.0"
