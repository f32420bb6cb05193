"""The security audit: its report files and README table, and a quick audit of the real model in CI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from secureinfer.attacks.report import (
    README_BEGIN,
    README_END,
    merge_reports,
    read_report,
    security_markdown,
    security_table,
    update_readme,
    write_report,
)
from secureinfer.attacks.traffic import views_p_value
from secureinfer.errors import InvalidRequestError

ROOT = Path(__file__).resolve().parent.parent


def _outcome(recovery: float) -> dict:
    return {
        "ran": True, "conversations": 2, "tokens": 300, "token_recovery": recovery, "chance_token_recovery": 0.016,
        "char_similarity": recovery, "span_recovery": recovery, "span_recovery_by_kind": {"name": recovery},
    }  # fmt: skip


def _extraction_run(perturbation: float, black: float, black_facts: int) -> dict:
    def fidelity(agreement, correct):
        return {"top1_agreement": agreement, "heldout_correct": correct, "heldout_total": 28, "heldout_accuracy": correct / 28}

    return {
        "scheme": "plain", "perturbation": perturbation, "queries": 100, "logprobs": 5, "epochs": 2,
        "gray_box_source": "the view holds the adapter in float (60 tensors): the surrogate is the adapter",
        "victim_heldout_correct": 21, "notes": ["0 of 100 answers were empty and taught nothing"],
        "fidelity": {"base": fidelity(0.5, 0), "black_box": fidelity(black, black_facts),
                     "gray_box": fidelity(1.0, 21), "white_box": fidelity(1.0, 21)},
        "ratios": {"gray/black top1_agreement": 1.0 / black, "white/black top1_agreement": 1.0 / black,
                   "gray/black heldout_accuracy": 21 / black_facts if black_facts else None,
                   "white/black heldout_accuracy": 21 / black_facts if black_facts else None},
    }  # fmt: skip


def _report() -> dict:
    nothing = {"ran": False, "why": "the device held no KV cache"}
    adapter = {"held_by": ["enclave"], "tensors": 120, "found": 0, "fraction_found": 0.0}
    return {
        "config": {"victims": ["a", "b"], "new_tokens": 4, "tamper_trials": 10, "seed": 0},
        "versions": {"git": "abc123"},
        "seconds": 12.0,
        "peak_rss_mib": 900.0,
        "schemes": {
            "plain": {
                "description": "baseline", "device_received_clear_token_ids": True,
                "conversation_attacks": {"kv_inversion": _outcome(0.99)}, "traffic": None, "tampering": None,
                "adapter": adapter | {"held_by": ["device"], "found": 120, "fraction_found": 1.0},
                "extraction": {"ran": True, "queried": "plain", "git": "def456",
                               "runs": [_extraction_run(0.0, 0.625, 0), _extraction_run(1.0, 0.5, 7)]},
                "seconds": 5.0,
            },
            "secureinfer": {
                "description": "blinded", "device_received_clear_token_ids": False,
                "conversation_attacks": {"kv_inversion": nothing}, "adapter": adapter,
                "traffic": {"views": 2, "elements": 1000, "min_uniformity_p": 0.4, "uniformity_p": [0.4, 0.7], "pad_reuse_pairs": 0},
                "tampering": {"modes": {}, "trials": 40, "detection_rate": 0.0, "false_alarms": 0, "wrong_output": 29},
                "extraction": {"ran": False, "why": "not measured here"}, "seconds": 7.0,
            },
        },
    }  # fmt: skip


def test_the_table_shows_each_scheme_with_its_numbers_and_chance():
    table = security_table(_report()).splitlines()
    plain = next(line for line in table if line.startswith("| `plain`"))
    secure = next(line for line in table if line.startswith("| `secureinfer`"))
    assert "token ids sent in clear" in plain and "99.0% tokens" in plain and "chance 1.6%" in plain
    assert "120 of 120 tensors found (held by device)" in plain
    assert "nothing to attack" in secure and "0% of 40 detected, 29 wrong outputs" in secure
    assert "min p = 0.4" in secure and "0 reused pads" in secure and "0 of 120 tensors found" in secure
    assert f"their p's uniform: KS p = {views_p_value([0.4, 0.7]):.2g};" in secure  # the views' p-values as a whole
    assert "pooled p" not in secure  # a report written before the pooled test says nothing of one
    pooled = _report()
    pooled["schemes"]["secureinfer"]["traffic"] |= {"pooled_uniformity_p": 0.37, "bins": 256}
    assert "| pooled p = 0.37; min p = 0.4 over 2 views" in security_table(pooled)


def test_the_extraction_table_gives_each_run_its_fidelities_and_ratios():
    table = security_table(_report())
    rows = [line for line in table.splitlines() if line.startswith("| `plain` | ")]
    off, on = rows  # one per perturbation (the attack row names plain's clear token ids)
    assert "| 0 | plain | 0.500 / 0.625 / 1.000 / 1.000 | 0 / 0 / 21 / 21 of 28 (21) |" in off
    assert "1.60, n/a (black-box 0)" in off  # gray ÷ black top-1, and facts where black-box got none
    assert "| 1 | plain |" in on and "2.00, 3.00" in on
    assert "Extraction ran apart from the rest of its scheme's audit: `plain` at git def456." in table
    assert "`secureinfer`" not in table.split("Extraction:")[0].split("| scheme | logit noise")[1]


def test_a_report_that_is_missing_or_not_a_report_is_refused_with_its_fix(tmp_path):
    with pytest.raises(InvalidRequestError, match="run `secureinfer audit --out DIR` first"):
        read_report(tmp_path)
    (tmp_path / "security.json").write_text("{not json")
    with pytest.raises(InvalidRequestError, match="is not JSON"):
        read_report(tmp_path)
    (tmp_path / "security.json").write_text("[1, 2]")
    with pytest.raises(InvalidRequestError, match="not an audit report"):
        read_report(tmp_path)
    write_report(_report(), tmp_path)
    assert read_report(tmp_path)["schemes"].keys() == {"plain", "secureinfer"}


def test_report_files_are_written(tmp_path):
    files = write_report(_report(), tmp_path / "report")
    assert json.loads((tmp_path / "report" / "security.json").read_text())["schemes"].keys() == {"plain", "secureinfer"}
    markdown = (tmp_path / "report" / "security.md").read_text()
    assert "the device held no KV cache" in markdown and "sensitive fields recovered 99%" in markdown
    assert "Note:" not in markdown
    write_report(_report() | {"notes": ["ran on a borrowed machine"]}, tmp_path / "noted")
    assert "Note: ran on a borrowed machine" in (tmp_path / "noted" / "security.md").read_text()
    plots = [f for f in files if f.suffix == ".png"]
    assert plots and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)


def test_the_readme_table_is_replaced_between_its_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\n\n{README_BEGIN}\nold table\n{README_END}\n\n## after\n")
    update_readme(readme, _report())
    text = readme.read_text()
    assert text.startswith("# intro\n\n") and text.endswith(f"{README_END}\n\n## after\n")
    assert "old table" not in text and "| `secureinfer` |" in text
    readme.write_text("# no markers\n")
    with pytest.raises(InvalidRequestError, match="no generated attack table"):
        update_readme(readme, _report())


def _rerun(config: dict) -> dict:
    """A later audit of `secureinfer` (its numbers changed) and of a scheme the first report lacked."""
    first = _report()
    changed = first["schemes"]["secureinfer"] | {
        "traffic": first["schemes"]["secureinfer"]["traffic"] | {"min_uniformity_p": 0.61},
        "tampering": {"modes": {}, "trials": 40, "detection_rate": 0.0, "false_alarms": 0, "wrong_output": 31},
        "seconds": 9.0,
    }
    hardened = changed | {
        "description": "checked", "seconds": 11.0,
        "tampering": {"modes": {}, "trials": 40, "detection_rate": 1.0, "false_alarms": 0, "wrong_output": 0},
    }  # fmt: skip
    return {
        "config": config | {"schemes": ["secureinfer", "hardened"]},
        "versions": {"git": "fff999"},
        "seconds": 21.0,
        "peak_rss_mib": 1200.0,
        "schemes": {"secureinfer": changed, "hardened": hardened},
    }


def test_a_rerun_replaces_its_schemes_and_every_scheme_keeps_its_commit():
    base = _report() | {"notes": ["plain's run was interrupted once"]}
    merged = merge_reports(base, _rerun(base["config"]))
    assert list(merged["schemes"]) == ["plain", "secureinfer", "hardened"] == merged["config"]["schemes"]
    assert merged["schemes"]["plain"] == base["schemes"]["plain"] | {"git": "abc123"}
    assert merged["schemes"]["secureinfer"]["tampering"]["wrong_output"] == 31
    assert [merged["schemes"][s]["git"] for s in merged["schemes"]] == ["abc123", "fff999", "fff999"]
    assert merged["seconds"] == 5.0 + 9.0 + 11.0 and merged["peak_rss_mib"] == 1200.0
    assert merged["notes"] == ["plain's run was interrupted once"]
    table = security_table(merged)
    secure = next(line for line in table.splitlines() if line.startswith("| `secureinfer`"))
    assert "min p = 0.61" in secure and "31 wrong outputs" in secure
    assert "git abc123 for `plain`; git fff999 for `secureinfer`, `hardened`, 25 s." in table
    assert "`plain` at git def456." in table  # plain's extraction still ran apart from its audit
    markdown = security_markdown(merged)
    assert "- Time: 5 s, at git abc123." in markdown and "- Time: 11 s, at git fff999." in markdown


@pytest.mark.parametrize("setting, value", [("seed", 1), ("victims", ["a"]), ("tamper_trials", 50)])
def test_a_rerun_under_other_settings_is_refused_naming_them(setting, value):
    base = _report()
    with pytest.raises(InvalidRequestError, match=f"measured with other settings \\({setting}\\)"):
        merge_reports(base, _rerun(base["config"] | {setting: value}))


def _audit_cli(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    from secureinfer.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(["audit", "--quiet", *args])
    return code, stderr.getvalue()


def test_audit_update_merges_into_the_report_in_out(tmp_path, tiny_gguf, monkeypatch):
    from secureinfer.attacks import audit

    config = audit.audit_config(audit.QUICK, ("plain", "secureinfer"), 0)
    write_report(_report() | {"config": config}, tmp_path)
    ran = []

    def rerun(checkpoint, schemes, size, seed, keep_views, progress):
        ran.append(schemes)
        return _rerun(audit.audit_config(size, schemes, seed))

    monkeypatch.setattr(audit, "run_audit", rerun)
    code, _ = _audit_cli("--model", str(tiny_gguf), "--quick", "--scheme", "secureinfer", "--scheme", "hardened",
                         "--update", "--out", str(tmp_path))  # fmt: skip
    assert code == 0 and ran == [("secureinfer", "hardened")]
    merged = read_report(tmp_path)
    assert list(merged["schemes"]) == ["plain", "secureinfer", "hardened"]
    assert merged["schemes"]["plain"]["git"] == "abc123" and merged["schemes"]["hardened"]["git"] == "fff999"


def test_audit_update_refuses_before_any_work(tmp_path, tiny_gguf, monkeypatch):
    from secureinfer.attacks import audit

    monkeypatch.setattr(audit, "run_audit", lambda *args: pytest.fail("the audit ran"))
    model = ["--model", str(tiny_gguf)]
    code, message = _audit_cli(*model, "--quick", "--update", "--out", str(tmp_path))
    assert code != 0 and "run `secureinfer audit --out DIR` first" in message and "Traceback" not in message
    write_report(_report() | {"config": audit.audit_config(audit.QUICK, ("plain",), 0)}, tmp_path)
    code, message = _audit_cli(*model, "--quick", "--seed", "3", "--update", "--out", str(tmp_path))
    assert code != 0 and "measured with other settings (seed)" in message and "--seed" in message
    code, message = _audit_cli(*model, "--update", "--extraction-only", "--out", str(tmp_path))
    assert code != 0 and "--extraction-only and --update together" in message


def test_the_project_readme_holds_the_markers():
    text = (ROOT / "README.md").read_text()
    assert text.count(README_BEGIN) == 1 and text.count(README_END) == 1


@pytest.mark.integration
def test_quick_audit_of_the_real_model(tmp_path):
    """`secureinfer audit --quick` as CI runs it; the attacks prove themselves on plain and find nothing on the rest."""
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    out = tmp_path / "report"
    command = [sys.executable, "-m", "secureinfer.cli", "audit", "--quick", "--quiet", "--out", str(out), "--readme", str(readme)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "security.json").read_text())
    schemes = report["schemes"]
    assert list(schemes) == ["plain", "kvshield", "kvmix", "secureinfer", "hardened"]
    assert report["versions"]["git"] and report["config"]["seed"] == 0

    attacks = schemes["plain"]["conversation_attacks"]
    assert attacks["kv_inversion"]["token_recovery"] >= 0.95 and attacks["vocab_matching"]["token_recovery"] >= 0.95
    assert schemes["plain"]["adapter"]["found"] == schemes["plain"]["adapter"]["tensors"]  # the device holds it
    # kvshield: the permutation stops plain KV inversion, not key recovery or sorted values, and the key is in
    # the device's RoPE table. kvmix: the KV attacks fail, the attention scores give the tokens away.
    attacks = schemes["kvshield"]["conversation_attacks"]
    assert attacks["kv_inversion"]["token_recovery"] < 0.1
    for name in ("kv_inversion_after_key_recovery", "vocab_matching_sorted", "hidden_state_inversion"):
        assert attacks[name]["token_recovery"] >= 0.95, name
    assert schemes["kvshield"]["key_recovery"]["weights_fraction"] == schemes["kvshield"]["key_recovery"]["rope_table_fraction"] == 1.0
    attacks = schemes["kvmix"]["conversation_attacks"]
    for name in ("kv_inversion", "kv_inversion_after_key_recovery", "vocab_matching", "vocab_matching_sorted"):
        assert attacks[name]["token_recovery"] <= attacks[name]["chance_token_recovery"] + 0.02, name
    assert not attacks["hidden_state_inversion"]["ran"] and attacks["attention_score_matching"]["token_recovery"] >= 0.95
    for scheme in ("secureinfer", "hardened"):
        attacks = schemes[scheme]["conversation_attacks"]
        ran = {name: outcome for name, outcome in attacks.items() if outcome["ran"]}
        assert list(ran) == ["blinded_nearest_embedding"], scheme
        assert ran["blinded_nearest_embedding"]["token_recovery"] <= ran["blinded_nearest_embedding"]["chance_token_recovery"] + 0.02
        traffic = schemes[scheme]["traffic"]
        assert traffic["pad_reuse_pairs"] == 0 and traffic["min_uniformity_p"] > 1e-4 and traffic["pooled_uniformity_p"] > 1e-4
        assert schemes[scheme]["adapter"]["found"] == 0 and schemes[scheme]["adapter"]["held_by"] == ["enclave"]
    assert schemes["hardened"]["tampering"]["detection_rate"] == 1.0 and schemes["hardened"]["tampering"]["false_alarms"] == 0
    assert schemes["secureinfer"]["tampering"]["detection_rate"] == 0.0
    assert security_table(report) in readme.read_text()
