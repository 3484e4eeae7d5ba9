import pytest

from replab.errors import ReplabError
from replab.harvest.hooks import parse_hook_name, parse_layers, resolve_hooks, stop_at_layer


def test_parse_layers_forms():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("1-2", 4) == [1, 2]
    assert parse_layers("2-", 4) == [2, 3]
    assert parse_layers("-1", 4) == [3]
    assert parse_layers("0,3", 4) == [0, 3]
    assert parse_layers([0, "2-3"], 4) == [0, 2, 3]


@pytest.mark.parametrize("spec", ["x", "4", "0-9", "", "1.5"])
def test_parse_layers_rejects(spec):
    with pytest.raises(ReplabError):
        parse_layers(spec, 4)


def test_resolve_aliases_and_raw(tiny):
    names = resolve_hooks(tiny, "resid_post,z", "0-1")
    assert names == ["blocks.0.attn.hook_z", "blocks.0.hook_resid_post",
                     "blocks.1.attn.hook_z", "blocks.1.hook_resid_post"]
    assert resolve_hooks(tiny, ["blocks.2.hook_resid_pre"], "all") == ["blocks.2.hook_resid_pre"]
    assert parse_hook_name("blocks.3.hook_resid_post") == ("resid_post", 3)
    assert parse_hook_name("blocks.3.mlp.hook_post") == ("mlp_post", 3)


@pytest.mark.parametrize("hooks", ["resid_nope", "blocks.9.hook_resid_post", "blocks.0.attn.hook_pattern", ""])
def test_resolve_rejects(tiny, hooks):
    with pytest.raises(ReplabError):
        resolve_hooks(tiny, hooks, "all")


def test_stop_at_layer():
    assert stop_at_layer(["blocks.1.hook_resid_post"], 4) == 2
    assert stop_at_layer(["blocks.3.hook_resid_post"], 4) == 4
    assert stop_at_layer(["hook_embed"], 4) == 1
    assert stop_at_layer(["ln_final.hook_normalized"], 4) is None
