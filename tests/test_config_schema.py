"""The one schema mechanism (harness/config_schema.py): every config kind gives the
same one-line error for an unknown key (with a "did you mean"), a wrong type and a
missing required key.  No host is touched; nothing boots."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import pytest
from pydantic import Field, ValidationError

from harness import config_schema as schema
from harness.config_schema import ConfigModel, optional
from harness.errors import UserError
from harness.kernel.manifest import ManifestFile, load_manifest
from harness.nightly.config import HostTable, NightlyFile, load_config
from harness.scenario import ScenarioFile, ScenarioTable, load_scenarios

SCEN = '[[scenario]]\nname = "s"\n'
NIGHTLY = 'scenarios = "scen.toml"\n[kernels.stock]\nbzimage = "bz"\n[kernels.patched]\nbzimage = "bz"\n' \
          '[[host]]\nname = "ci"\nvirtual = "debian"\n'
MANIFEST = 'name = "x"\ndescription = "d"\n[base]\ndebian_source = "linux-source-6.1"\n[series]\nmbox = "m"\n'


def _error(load, path: Path) -> str:
    with pytest.raises(UserError) as exc:
        load(path)
    line = exc.value.one_line()
    assert "\n" not in line and str(path) in line, line
    return line


def _scenario(tmp_path: Path, text: str) -> str:
    p = tmp_path / "s.toml"
    p.write_text(text)
    return _error(load_scenarios, p)


def _nightly(tmp_path: Path, text: str) -> str:
    (tmp_path / "scen.toml").write_text(SCEN)
    (tmp_path / "bz").write_bytes(b"x")
    p = tmp_path / "nightly.toml"
    p.write_text(text)
    return _error(lambda q: load_config(q, load_scenarios=False), p)


def _manifest(tmp_path: Path, text: str) -> str:
    (tmp_path / "m").write_text("From x\n")
    p = tmp_path / "series.toml"
    p.write_text(text)
    return _error(load_manifest, p.resolve())


# -- the three kinds, the same three errors ----------------------------------------------

@pytest.mark.parametrize("load,text,needle", [
    (_scenario, SCEN + "vcpu = 2\n", "unknown key 'vcpu' in [[scenario]] #1; did you mean 'vcpus'?"),
    (_scenario, '[defaults]\nbakcing = "anon"\n' + SCEN,
     "unknown key 'bakcing' in [defaults]; did you mean 'backing'?"),
    (_nightly, NIGHTLY.replace('name = "ci"', 'name = "ci"\nbot = "kexec"'),
     "unknown key 'bot' in [[host]] #1; did you mean 'boot'?"),
    (_nightly, NIGHTLY.replace('bzimage = "bz"', 'bzimage = "bz"\nrelase = "6.1"', 1),
     "unknown key 'relase' in [kernels.stock]; did you mean 'release'?"),
    (_nightly, "scenario = 'scen.toml'\n" + NIGHTLY,
     "unknown key 'scenario' in the top level; did you mean 'scenarios'?"),
    (_manifest, MANIFEST.replace("[series]", "[series]\nmesage_id = 'x'"),
     "unknown key 'mesage_id' in [series]; did you mean 'message_id'?"),
])
def test_unknown_key_did_you_mean(tmp_path, load, text, needle):
    assert needle in load(tmp_path, text)


def test_unknown_key_without_a_close_match_lists_the_keys(tmp_path):
    msg = _manifest(tmp_path, MANIFEST.replace("[series]", "[series]\nzzz = 1"))
    assert "unknown key 'zzz' in [series]; known keys: message_id, mbox, patch_dir" in msg


@pytest.mark.parametrize("load,text,needle", [
    (_scenario, SCEN + 'vcpus = "2"\n', "s.toml [[scenario]] #1: vcpus '2' is not an integer; fix the value"),
    (_scenario, SCEN + "mem = [512, true]\n", "mem True is not a size"),
    (_scenario, "defaults = 1\n" + SCEN, "defaults 1 is not a table; write it as [defaults]"),
    (_nightly, NIGHTLY.replace('name = "ci"', 'name = "ci"\nl1_mem_mib = "2G"'),
     "nightly.toml [[host]] #1: l1_mem_mib '2G' is not an integer; fix the value"),
    (_nightly, "threshold = '10'\n" + NIGHTLY, "nightly.toml: threshold '10' is not a number"),
    (_nightly, "host = 3\n" + NIGHTLY.split("[[host]]")[0],
     "host 3 is not an array of tables; write each entry as [[host]]"),
    (_nightly, NIGHTLY.replace("[kernels.patched]\nbzimage = \"bz\"\n", "") + "[kernels]\npatched = 3\n",
     "[kernels.patched] 3 is not a table"),
    (_manifest, MANIFEST + "[build]\nfragments = ['kvm-host', 2]\n",
     "series.toml [build]: fragments 2 is not a string; fix the value"),
    (_manifest, MANIFEST.replace('name = "x"', "name = 1"), "series.toml: name 1 is not a string"),
])
def test_wrong_type(tmp_path, load, text, needle):
    assert needle in load(tmp_path, text)


@pytest.mark.parametrize("load,text,needle", [
    (_nightly, NIGHTLY.replace('scenarios = "scen.toml"\n', ""),
     "missing 'scenarios' in the top level (scenario TOML file); add it"),
    (_nightly, NIGHTLY.replace('name = "ci"\n', ""), "missing 'name' in [[host]] #1 (short name"),
    (_nightly, NIGHTLY.replace('bzimage = "bz"', 'release = "6.1"', 1), "missing 'bzimage' in [kernels.stock]"),
    (_manifest, MANIFEST.replace('description = "d"\n', ""), "missing 'description' in the top level (one line)"),
    (_manifest, MANIFEST.split("[series]")[0], "missing 'series' in the top level (the patches)"),
])
def test_missing_required(tmp_path, load, text, needle):
    assert needle in load(tmp_path, text)


def test_scenario_flags_are_named_as_flags():
    """The flags of one run go through the same model; errors name the flag."""
    from harness.scenario import _from_flags

    with pytest.raises(UserError, match=r"^--vcpus 'two' is not an integer; fix the value$"):
        _from_flags({"vcpus": "two"})
    with pytest.raises(UserError, match=r"^--repeat 0 is below 1"):
        _from_flags({"repeat": "0"})
    assert _from_flags({"vcpus": "3", "mem": "1G", "baseline_s": "0.5"}) == {
        "vcpus": [3], "mem": [1024], "baseline_s": 0.5}


# -- the formatter on its own ----------------------------------------------------------------

class _Leaf(ConfigModel):
    size: int = Field(description="how big")
    tags: Optional[List[str]] = optional("labels")


class _Doc(ConfigModel):
    title: Optional[str] = optional("a title")
    leaf: Optional[_Leaf] = optional("one table")
    leaves: Optional[List[_Leaf]] = optional("an array of tables")
    named: Optional[Dict[str, _Leaf]] = optional("tables by name")


@pytest.mark.parametrize("data,line", [
    ({"titel": "x"}, "f.toml: unknown key 'titel' in the top level; did you mean 'title'?"),
    ({"leaf": {"size": 1, "sise": 2}}, "f.toml: unknown key 'sise' in [leaf]; did you mean 'size'?"),
    ({"leaves": [{"size": 1}, {}]}, "f.toml: missing 'size' in [[leaves]] #2 (how big); add it"),
    ({"named": {"a": {"size": 1.5}}}, "f.toml [named.a]: size 1.5 is not an integer; fix the value"),
    ({"leaf": {"size": 1, "tags": ["a", 3]}}, "f.toml [leaf]: tags 3 is not a string; fix the value"),
    ({"title": ["x"]}, "f.toml: title ['x'] is not a string; fix the value"),
    ({"leaf": []}, "f.toml: leaf [] is not a table; write it as [leaf]"),
])
def test_format_error(data, line):
    with pytest.raises(UserError) as exc:
        schema.validate(_Doc, data, "f.toml")
    assert exc.value.one_line() == line


def test_unknown_key_is_reported_before_other_errors():
    with pytest.raises(ValidationError) as exc:
        _Doc.model_validate({"title": 3, "zz": 1})
    assert schema.format_error(exc.value, _Doc, None).startswith("unknown key 'zz'")


def test_models_are_frozen_and_forbid_extra_keys():
    for model in (ScenarioFile, ScenarioTable, NightlyFile, HostTable, ManifestFile):
        assert model.model_config.get("extra") == "forbid" and model.model_config.get("frozen") is True
    t = ScenarioTable.model_validate({"name": "x"})
    with pytest.raises(ValidationError):
        t.name = "y"  # type: ignore[misc]
