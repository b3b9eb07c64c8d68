"""Adapters that do not fit are refused with a precise error, and nothing is left half-done."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from catalog.errors import (
    IncompatibleAdapter,
    InvalidArgument,
    InvalidPack,
    InvalidReference,
    NotFound,
)
from catalog.pack import import_peft_dir
from engine_plugin import LocalPackSource, ResidentEngine
from tests import factories
from tests.engine.conftest import Arch, make_ids


def assert_untouched(engine: ResidentEngine) -> None:
    stats = engine.stats()
    assert stats["resident"] == [] and stats["free_slots"] == engine.num_slots
    assert all(engine.pool.is_clear(slot) for slot in range(engine.num_slots + 1))


def publish_from(model, tmp_path: Path, name: str, base_id: str, **spec) -> LocalPackSource:  # type: ignore[no-untyped-def]
    source = LocalPackSource()
    directory = factories.make_peft_adapter(model, tmp_path / name.replace("/", "_"), **spec)
    source.publish(name, import_peft_dir(directory, base_id=base_id))
    return source


def test_other_base_is_refused(llama: Arch) -> None:
    source = LocalPackSource()
    pack = import_peft_dir(llama.dirs["t/qv-r8"], base_id="some-other-base")
    source.publish("t/x", pack)
    engine = llama.engine(source)
    with pytest.raises(IncompatibleAdapter, match="some-other-base"):
        engine.attach("t/x")
    with pytest.raises(IncompatibleAdapter):
        engine.forward(make_ids(1, 2), ["t/x"])
    assert_untouched(engine)
    assert source.fetches == 0  # refused from catalog metadata, nothing downloaded


def test_a_base_loaded_from_disk_is_one_base_however_its_path_is_spelled(
    llama: Arch, tmp_path: Path
) -> None:
    """A model loaded from a folder takes that folder as its base id; an adapter trained on
    ``/x/../base`` (or a symlink to it) is for the same base, a hub id is not unless declared."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "base"
    llama.base.save_pretrained(folder)
    (tmp_path / "link").symlink_to(folder)
    spelled = [str(tmp_path / "x" / ".." / "base"), str(tmp_path / "link"), f"{folder}/"]
    (tmp_path / "x").mkdir()
    source = LocalPackSource()
    for i, base_id in enumerate(spelled):
        source.publish(f"t/a{i}", import_peft_dir(llama.dirs["t/qv-r8"], base_id=base_id))
    source.publish("t/hub", import_peft_dir(llama.dirs["t/qv-r8"], base_id="acme/tiny-llama"))
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    engine = ResidentEngine(loaded, catalog=source, num_slots=4)
    assert engine.base_id == str(folder)
    for i in range(len(spelled)):
        engine.attach(f"t/a{i}")
    with pytest.raises(
        IncompatibleAdapter, match=r"build the engine with base_id='acme/tiny-llama'"
    ):
        engine.attach("t/hub")
    declared = ResidentEngine(
        AutoModelForCausalLM.from_pretrained(folder),
        catalog=source,
        num_slots=1,
        base_id="acme/tiny-llama",
    )
    assert declared.attach("t/hub").number == 1


def test_rank_above_max_rank_is_refused(llama: Arch) -> None:
    engine = llama.engine(max_rank=8)
    with pytest.raises(IncompatibleAdapter, match="rank 16, above this engine's max_rank 8"):
        engine.attach("t/mlp-r16-rs")
    assert_untouched(engine)
    engine.attach("t/qv-r8")  # rank 8 fits exactly


def test_module_the_engine_does_not_serve_is_refused(llama: Arch) -> None:
    engine = llama.engine(target_modules=("q_proj", "v_proj"))
    with pytest.raises(IncompatibleAdapter, match=r"mlp\.down_proj"):
        engine.attach("t/mlp-r16-rs")
    assert_untouched(engine)
    engine.attach("t/qv-r8")


def test_wrong_shapes_are_refused(llama: Arch, tmp_path: Path) -> None:
    """Same base_id, but trained on a wider model: caught from the pack manifest."""
    wide = factories.build_model(factories.tiny_llama_config(hidden_size=96))
    source = publish_from(wide, tmp_path, "t/wide", llama.base_id, rank=4)
    engine = llama.engine(source)
    with pytest.raises(IncompatibleAdapter, match="96->96 but the base's is 64->64"):
        engine.attach("t/wide")
    assert_untouched(engine)
    assert len(engine.host) == 0


def test_more_layers_than_the_base_are_refused(llama: Arch, tmp_path: Path) -> None:
    deep = factories.build_model(factories.tiny_llama_config(num_hidden_layers=4))
    source = publish_from(deep, tmp_path, "t/deep", llama.base_id, rank=4)
    engine = llama.engine(source)
    with pytest.raises(IncompatibleAdapter, match="4 layers"):
        engine.attach("t/deep")
    assert_untouched(engine)


def test_non_finite_weights_are_refused(llama: Arch, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        llama.fresh_base(), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"])
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(float("nan"))
    model.save_pretrained(str(tmp_path / "nan"))
    source = LocalPackSource()
    source.publish("t/nan", import_peft_dir(tmp_path / "nan", base_id=llama.base_id))
    engine = llama.engine(source)
    with pytest.raises(InvalidPack, match="NaN"):
        engine.attach("t/nan")
    assert_untouched(engine)


@pytest.mark.parametrize("ref", ["no-slash", "T/upper", "t/a@", "t/a@sha256:zz"])
def test_bad_references_are_refused(make_engine: Callable[..., ResidentEngine], ref: str) -> None:
    engine = make_engine()
    with pytest.raises(InvalidReference):
        engine.forward(make_ids(1, 2), [ref])
    assert_untouched(engine)


def test_unknown_adapter_is_not_found(make_engine: Callable[..., ResidentEngine]) -> None:
    engine = make_engine()
    with pytest.raises(NotFound):
        engine.attach("t/missing")
    with pytest.raises(NotFound):
        engine.forward(make_ids(2, 2), ["t/qv-r8", "t/missing"])
    # the first row's adapter was loaded, but no lease leaked from the failed batch
    assert all(r["in_flight"] == 0 for r in engine.stats()["resident"])


def test_adapter_list_must_match_rows(make_engine: Callable[..., ResidentEngine]) -> None:
    engine = make_engine()
    with pytest.raises(InvalidArgument, match="2 entries but the batch has 3 rows"):
        engine.forward(make_ids(3, 2), ["t/qv-r8", None])


def test_bad_engine_arguments(llama: Arch) -> None:
    with pytest.raises(ValueError):
        ResidentEngine(llama.fresh_base(), catalog=LocalPackSource(), num_slots=0)
    with pytest.raises(ValueError, match="nope"):
        ResidentEngine(llama.fresh_base(), catalog=LocalPackSource(), target_modules=["nope"])


def test_a_model_is_wrapped_once(llama: Arch) -> None:
    engine = llama.engine()
    with pytest.raises(ValueError, match="already"):
        ResidentEngine(engine.model, catalog=LocalPackSource())
