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


def test_one_head_syntax_for_every_head_list():
    """Heads are parsed by one function (replab.hooks) for `replab heads`, `patch patterns`,
    the circuit components, path receivers and `--compare-heads`."""
    from replab.circuits.components import parse_component
    from replab.circuits.edge_runs import _heads_arg
    from replab.circuits.path import parse_receiver
    from replab.heads import runs as heads_runs
    from replab.hooks import check_head, parse_head, parse_head_list

    assert heads_runs.parse_head_list is parse_head_list
    assert parse_head_list("L5H3, 20.1,l5h3,7:0") == [(5, 3), (20, 1), (7, 0)]
    assert parse_head_list([(1, 2), (1, 2)]) == [(1, 2)] and parse_head_list(["L1H2"], 4, 4) == [(1, 2)]
    assert parse_head("5H3") == (5, 3)
    for bad in ("L5", "banana", "5.x"):
        with pytest.raises(ReplabError, match=r"bad head .*use L5H3 or 5\.3"):
            parse_head_list(bad)
    with pytest.raises(ReplabError, match="no heads given"):
        parse_head_list(" , ")
    with pytest.raises(ReplabError, match=r"L9H1 does not exist: layer 9 is out of range \(this model has layers"):
        parse_head_list("9.1", 4, 4)
    with pytest.raises(ReplabError, match=r"L1H7 does not exist: head 7 is out of range"):
        check_head(1, 7, 4, 4)
    c = parse_component("5.3.v@-1")
    assert c.name == "L5H3.v@-1" and parse_component("l5h3").name == "L5H3"
    r = parse_receiver("9.1.q")
    assert (r.kind, r.layer, r.head, r.part) == ("head", 9, 1, "q")
    assert _heads_arg("5.3,L2H1,L5H3") == ["L5H3", "L2H1"]
    with pytest.raises(ReplabError, match="query heads such as L5H3"):
        _heads_arg("L1MLP")
