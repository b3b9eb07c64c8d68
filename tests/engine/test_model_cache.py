"""A KV cache passed under the model's own keyword is used, without a deprecation warning, on
whichever transformers runs the tests (5.25 here: ``cache``; 5.17 on the GPU machine:
``past_key_values``, where ``cache=`` would be swallowed by ``**kwargs`` and ignored)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from engine_plugin.model_cache import cache_keyword, cache_kwargs, returned_cache
from tests import factories


@pytest.mark.parametrize("make_config", [factories.tiny_llama_config, factories.tiny_qwen2_config])
def test_a_decode_step_through_the_cache_matches_a_full_forward(make_config: object) -> None:
    model = factories.build_model(make_config())  # type: ignore[operator]
    ids = torch.randint(
        0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0)
    )
    named = inspect.signature(model.forward).parameters
    assert cache_keyword(model) == ("cache" if "cache" in named else "past_key_values")
    with torch.no_grad(), warnings.catch_warnings():
        # Our calls must not use a name this transformers deprecates.
        warnings.filterwarnings("error", message="`past_key_values`", category=FutureWarning)
        full = model(input_ids=ids).logits[:, -1]
        prompt = model(input_ids=ids[:, :5], use_cache=True)
        step = model(input_ids=ids[:, 5:], **cache_kwargs(model, returned_cache(prompt)))
        assert returned_cache(step) is returned_cache(prompt)  # the same cache, grown by one
        without_cache = model(input_ids=ids[:, 5:]).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-5, atol=1e-5)
    # The step really read the cache: without it, one token alone predicts something else.
    assert not torch.allclose(without_cache, full, rtol=1e-3, atol=1e-3)


def test_an_output_without_a_cache_is_named() -> None:
    model = factories.build_model(factories.tiny_llama_config())
    with torch.no_grad():
        output = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)
    with pytest.raises(KeyError, match="holds no KV cache"):
        returned_cache(output)
