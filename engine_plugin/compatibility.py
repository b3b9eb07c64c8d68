"""Whether an adapter fits an engine: its base, rank, layers, modules, shapes and experts.

Checked twice: from the catalog's metadata alone before anything is fetched
(:meth:`AdapterFit.check_revision`), then against the pack's manifest before staging
(:meth:`AdapterFit.check_manifest`, which also says which slot modules each pack module fills).
Every refusal is an ``IncompatibleAdapter`` naming the adapter and what does not fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from catalog.bases import base_identity
from catalog.errors import IncompatibleAdapter
from catalog.model import Revision
from catalog.pack import ModuleSpec, PackManifest
from engine_plugin.experts import ExpertsTarget, expert_routes
from engine_plugin.slots import SlotPool
from engine_plugin.staging import SlotRoute


@dataclass(frozen=True)
class AdapterFit:
    """What an engine can take: its base (``base_id``; empty: only shapes are checked), slot
    rank, layer count, slot modules and experts modules."""

    engine_id: str
    base_id: str | None
    max_rank: int
    num_layers: int
    pool: SlotPool
    experts: Mapping[str, ExpertsTarget]

    def check_revision(self, revision: Revision) -> None:
        """Refuse from catalog metadata alone, before fetching anything."""
        where = f"{revision.adapter}@{revision.number}"
        if self.base_id and revision.base_id:
            self._check_base(where, revision.base_id)
        if revision.rank > self.max_rank:
            raise IncompatibleAdapter(
                f"{where} has rank {revision.rank}, above this engine's max_rank {self.max_rank}"
            )
        if revision.num_experts and not any(
            e.num_experts == revision.num_experts for e in self.experts.values()
        ):
            raise IncompatibleAdapter(self._experts_message(where, revision.num_experts))
        if revision.num_layers > self.num_layers:
            raise IncompatibleAdapter(
                f"{where} is for a base with {revision.num_layers} layers; "
                f"this base has {self.num_layers}"
            )
        unknown = [
            m
            for m in revision.target_modules
            if m not in self.pool.modules and expert_routes(m, self.experts) is None
        ]
        if unknown:
            raise IncompatibleAdapter(self._unknown_modules_message(where, unknown))

    def check_manifest(
        self, revision: Revision, manifest: PackManifest
    ) -> dict[str, list[SlotRoute]]:
        """Refuse a pack whose manifest does not fit the base's modules, shapes and slots;
        return where each of its modules goes."""
        where = f"{revision.adapter}@{revision.number}"
        if self.base_id:
            self._check_base(where, manifest.base_id)
        num_layers = self.num_layers
        routes: dict[str, list[SlotRoute]] = {}
        filled: dict[str, str] = {}
        for spec in manifest.modules:
            spec_routes = self._routes(where, spec)
            for route in spec_routes:
                if route.slot_module in filled:
                    raise IncompatibleAdapter(
                        f"{where} modules {filled[route.slot_module]!r} and {spec.name!r} both "
                        f"adapt {route.slot_module!r}"
                    )
                filled[route.slot_module] = spec.name
            routes[spec.name] = spec_routes
            if spec.layers[-1] >= num_layers:
                raise IncompatibleAdapter(
                    f"{where} module {spec.name!r} adapts layer {spec.layers[-1]} "
                    f"but the base has {num_layers} layers"
                )
            if spec.rank > self.max_rank:
                raise IncompatibleAdapter(
                    f"{where} module {spec.name!r} has rank {spec.rank}, "
                    f"above this engine's max_rank {self.max_rank}"
                )
        return routes

    def _check_base(self, where: str, trained_for: str) -> None:
        """Refuse an adapter trained for another base (ids compared by ``base_identity``:
        one local folder spelled two ways is one base)."""
        if base_identity(trained_for) == base_identity(self.base_id):
            return
        raise IncompatibleAdapter(
            f"{where} was trained for base {trained_for!r}, but engine {self.engine_id} serves "
            f"{self.base_id!r}; if this model is that base (a local copy of it, say), build the "
            f"engine with base_id={trained_for!r}"
        )

    def _routes(self, where: str, spec: ModuleSpec) -> list[SlotRoute]:
        """The slot modules ``spec`` fills, checked against their shapes and expert counts."""
        if spec.num_experts:
            routes = expert_routes(spec.name, self.experts)
        else:
            routes = [SlotRoute(spec.name)] if spec.name in self.pool.modules else None
        if routes is None:
            raise IncompatibleAdapter(self._unknown_modules_message(where, [spec.name]))
        targets = [self.pool.modules[route.slot_module].target for route in routes]
        base_out = sum(
            t.out_features if r.rows is None else r.rows[1] - r.rows[0]
            for r, t in zip(routes, targets, strict=True)
        )
        for target in targets:
            if spec.num_experts != target.num_experts:
                raise IncompatibleAdapter(
                    f"{where} module {spec.name!r} has {spec.num_experts} experts "
                    f"but the base's {target.name!r} has {target.num_experts}"
                )
            if (spec.in_features, spec.out_features) != (target.in_features, base_out):
                raise IncompatibleAdapter(
                    f"{where} module {spec.name!r} is {spec.in_features}->{spec.out_features} "
                    f"but the base's is {target.in_features}->{base_out}"
                )
        return routes

    def _experts_message(self, where: str, num_experts: int) -> str:
        held = sorted({e.num_experts for e in self.experts.values()})
        if not held:
            return f"{where} is an expert (MoE) adapter; this base has no experts modules to adapt"
        return (
            f"{where} adapts {num_experts} experts per layer; this base's experts modules "
            f"have {', '.join(map(str, held))}"
        )

    def _unknown_modules_message(self, where: str, unknown: Sequence[str]) -> str:
        return (
            f"{where} adapts {', '.join(map(repr, unknown))}, which this engine does not "
            f"serve (its target modules: {', '.join(self._served_modules())})"
        )

    def _served_modules(self) -> list[str]:
        dense = [n for n, m in self.pool.modules.items() if not m.target.num_experts]
        experts = [f"{path} (gate_up_proj, down_proj)" for path in self.experts]
        return sorted(dense) + experts
