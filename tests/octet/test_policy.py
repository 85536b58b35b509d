"""Policy rules, overrides, presets and serialisation (pure torch, no host)."""
import json

import pytest
import torch.nn as nn

from comfyui_octet.octet import WeightOnlyConfig, config_for_mode, quantize_
from comfyui_octet.octet.api import OctetError
from comfyui_octet.octet.policy import Policy, Rule, parse_overrides, parse_rules
from comfyui_octet.octet.presets import PRESET_NAMES, build_policy, family_for, preset
from comfyui_octet.octet.report import write_report

DYN = config_for_mode("dynamic", kinds=("linear",), backend="torch")


def action(policy, name):
    return policy.action_for(name)[0]


def test_glob_covers_the_module_and_its_children_regex_searches():
    r = Rule("time_embed", "keep")
    assert r.matches("time_embed") and r.matches("time_embed.0")
    assert not r.matches("x.time_embed.0") and not r.matches("time_embedding.0")
    g = Rule("*.attn2.to_k", "keep")
    assert g.matches("input_blocks.1.1.transformer_blocks.0.attn2.to_k")
    assert not g.matches("input_blocks.1.1.transformer_blocks.0.attn2.to_q")
    rx = Rule(r"ff\.net\.2$", "weight_only", regex=True)
    assert rx.matches("a.ff.net.2") and not rx.matches("a.ff.net.2.x")


def test_precedence_override_then_first_rule_then_preset_then_default():
    p = build_policy("SD15", rules="out.2: dynamic\n*.attn2.*: weight_only\n*.attn2.to_k: keep",
                     overrides="time_embed.0: weight_only", default_action="static")
    assert action(p, "time_embed.0") == "weight_only"          # override beats the preset's keep
    assert action(p, "time_embed.2") == "keep"                 # preset
    assert action(p, "out.2") == "dynamic"                     # user rule beats the preset
    assert action(p, "x.attn2.to_k") == "weight_only"          # first matching rule wins
    assert action(p, "x.attn1.to_q") == "static"               # default action
    assert p.action_for("x.attn2.to_k")[1].startswith("rule 2")


def test_decide_maps_actions_to_configs_keeping_kinds_and_backend():
    p = Policy(rules=[Rule("a", "keep"), Rule("b", "weight_only"), Rule("c", "default")])
    assert p.decide("a", None, DYN)[0] is None
    cfg, why = p.decide("b", None, DYN)
    assert isinstance(cfg, WeightOnlyConfig) and cfg.kinds == ("linear",) and cfg.backend == "torch"
    assert "b" in why
    assert p.decide("c", None, DYN)[0] is DYN
    assert p.decide("zzz", None, DYN) == (DYN, "")


def test_quantize_with_policy_skips_exactly_the_kept_layers():
    net = nn.Sequential()
    for name in ("time_embed", "body", "out"):
        net.add_module(name, nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
    p = build_policy(None, rules="time_embed: keep\nout.1: weight_only")
    result = quantize_(net, DYN, policy=p, inplace=False)
    decisions = {r.name: r.decision for r in result.layers}
    assert decisions == {"time_embed.0": "skipped", "time_embed.1": "skipped", "body.0": "dynamic",
                         "body.1": "dynamic", "out.0": "dynamic", "out.1": "weight_only"}
    assert "rule 1" in next(r.reason for r in result.layers if r.name == "time_embed.0")


@pytest.mark.parametrize("text, needle", [
    ("*.attn2.to_k keep", "has no action"),
    ("*.attn2.to_k: fp8", "Unknown policy action"),
    ("re:(unclosed: keep", "does not compile"),
    ("re:nothing", "has no action"),
])
def test_bad_rules_say_what_is_wrong(text, needle):
    with pytest.raises(OctetError, match=needle):
        parse_rules(text)


def test_rule_text_comments_aliases_and_regex_with_colons():
    rules = parse_rules("# a comment\n\n*.ff.net.2: bf16  # trailing\nre:^(?:a|b)\\.x$: w8a8\n")
    assert [(r.pattern, r.action, r.regex) for r in rules] == [("*.ff.net.2", "keep", False),
                                                              ("^(?:a|b)\\.x$", "dynamic", True)]
    assert parse_overrides("out.2: fp16\n") == {"out.2": "keep"}
    with pytest.raises(OctetError, match="wildcards"):
        parse_overrides("*.x: keep")


def test_policy_json_round_trip_gives_the_same_decisions():
    p = build_policy("Flux", conservative=True, rules="re:single_blocks\\.0\\.: weight_only",
                     overrides="img_in: dynamic", default_action="weight_only")
    p.notes["txt_in"] = "a note"
    p.scores["txt_in"] = 31.5
    q = Policy.from_json(json.dumps(p.to_dict()))
    names = ["img_in", "txt_in", "single_blocks.0.linear1", "single_blocks.1.linear2", "double_blocks.0.img_mlp.2",
             "double_blocks.0.img_attn.qkv", "final_layer.linear"]
    for n in names:
        assert p.decide(n, None, DYN) == q.decide(n, None, DYN)
    assert q.name == p.name and q.scores == p.scores
    compact = p.to_dict(compact=True)
    assert "notes" not in compact and Policy.from_dict(compact).action_for("img_in") == ("dynamic", "override")


def test_presets_and_family_mapping():
    assert set(PRESET_NAMES) >= {"SD15", "SDXL", "SD3", "Flux", "Wan", "generic"}
    assert family_for(["SSD1B", "SDXL", "BASE", "object"]) == "SDXL"
    assert family_for(["FluxSchnell", "Flux", "BASE"]) == "Flux"
    assert family_for(["WAN22_T2V", "WAN21_T2V", "BASE"]) == "Wan"
    assert family_for(["HunyuanVideo", "BASE"]) == "generic"
    with pytest.raises(OctetError, match="Unknown preset"):
        preset("SD9")
    std, cons = preset("SD15"), preset("SD15", conservative=True)
    assert len(cons.rules) > len(std.rules)
    assert action(std, "a.attn2.to_v") != "keep" and action(cons, "a.attn2.to_v") == "keep"


def test_unmatched_reports_typos_but_not_preset_rules():
    p = build_policy("SDXL", rules="*.atn2.to_k: keep\n*.attn2.to_k: keep", overrides="out.3: keep")
    rules, overrides = p.unmatched(["out.2", "a.attn2.to_k"])
    assert [r.pattern for r in rules] == ["*.atn2.to_k"] and overrides == ["out.3"]


def test_write_report_beside_a_checkpoint(tmp_path):
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    p = build_policy(None, rules="0: keep")
    p.scores["1"] = 42.0
    result = quantize_(net, DYN, policy=p, inplace=False)
    txt, js = write_report(str(tmp_path / "m.safetensors"), result.to_dict()["layers"], p.to_dict(), {"mode": "x"})
    text = open(txt).read()
    assert txt.endswith("m.report.txt") and "keep" in text and "42.0" in text and "50.00% of parameters" in text
    assert json.load(open(js))["policy"]["scores"] == {"1": 42.0}


@pytest.mark.parametrize("regex, refused", [
    ("(a+)+$", True), ("(a|aa)*b", True), ("((a+)b)+", True), ("(a{2,})+", True), (r"(\w*\.)*x", True),
    (r"^(input|output)_blocks\.", False), ("(ab){2,}", False), (r"(attn1|attn2)\.to_k$", False),
    ("[(+]+x", False), (r"^input_blocks\.(1|2)\.", False),
])
def test_regexes_that_can_backtrack_exponentially_are_refused(regex, refused):
    if refused:
        with pytest.raises(OctetError, match="exponential"):
            parse_rules(f"re:{regex}: keep")
    else:
        assert parse_rules(f"re:{regex}: keep")[0].pattern == regex


def test_policy_text_limits():
    from comfyui_octet.octet import policy
    with pytest.raises(OctetError, match="limit is 65536"):
        parse_rules("a: keep\n" * 10000)
    with pytest.raises(OctetError, match=f"limit is {policy.MAX_RULES}"):
        parse_rules("*.a: keep\n" * (policy.MAX_RULES + 1))
    with pytest.raises(OctetError, match="Line 2 .* limit is"):
        parse_rules("a: keep\n" + "b" * 600 + ": keep")
    with pytest.raises(OctetError, match="keep patterns under"):
        parse_rules("x" * 300 + ": keep")
    assert len(parse_rules("# comment\n" * 2000 + "*.a: keep")) == 1   # comments do not count as rules
