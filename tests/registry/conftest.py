"""The registry tests share the service fixtures: real PEFT adapters, a real gRPC catalog."""

from tests.service.conftest import (  # noqa: F401  (fixtures)
    adapter_dirs,
    base_model,
    client,
    packs,
    served,
)
