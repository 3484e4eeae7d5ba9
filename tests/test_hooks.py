import pytest

from replab.errors import ReplabError
from replab.hooks import parse_hook_name, parse_layers, resolve_hooks, stop_at_layer


def test_parse_layers_forms():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("1-2", 4) == [1, 2]
    assert parse_layers("2-", 4) == [2, 3]
    assert parse_layers("-1", 4) == [3]
    assert parse_layers("0,3", 4) == [0, 3]
    assert parse_layers([0, "2-3"], 4) == [0, 2, 3]


@pytest.mark.parametrize("spec", ["x", "4", "0-9", "", "1.5", "3-1", "-1-0", "-5"])
def test_parse_layers_rejects(spec):
    with pytest.raises(ReplabError):
        parse_layers(spec, 4)


def test_parse_layers_names_the_given_layer():
    # the message quotes what the user typed, not the wrapped index (-5 on 4 layers is not "-1")
    with pytest.raises(ReplabError, match=r"layer -5 \(in '-5'\) is out of range"):
        parse_layers("-5", 4)
    with pytest.raises(ReplabError, match="reversed"):
        parse_layers("3-1", 4)


def test_one_vocabulary_resid_is_ambiguous():
    from replab.hooks import canonical_site, hook_name

    with pytest.raises(ReplabError, match="ambiguous"):
        canonical_site("resid")
    assert canonical_site("blocks.3.hook_resid_pre") == ("resid_pre", 3)
    assert canonical_site("head_v", 2) == ("v", 2)
    assert hook_name("neurons", 1) == "blocks.1.mlp.hook_post"


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
