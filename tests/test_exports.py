"""The suite's export factory (tests/exports.py): equal requests share one build, the on-disk cache is keyed
by everything a build depends on (a changed input is a new entry, never a stale hit), and a write into a
shared export is caught."""

from __future__ import annotations

import dataclasses

import pytest

from . import exports as E

#: one small graph: a real build in a few seconds
SMALL = E.ExportSpec(**E.GOLDENS_FLOW, graphs=("shallow_step_1",))


def test_every_dependency_is_in_the_key():
    deps = E.dependencies()
    assert set(deps) == {"package", "factory", "goldens", "libraries"}
    spec = dataclasses.asdict(SMALL)
    key = E.cache_key("export", spec, deps)
    assert key == E.cache_key("export", dict(spec), dict(deps))   # a pure function of its inputs
    for name in deps:
        assert E.cache_key("export", spec, {**deps, name: "changed"}) != key, name
    for field, value in [("max_batch", 2), ("dtype", "fp16"), ("trt_variants", True), ("grid", (3, 5)),
                         ("text_encoder", "tiny_t5"), ("graphs", ("shallow_step_2",))]:
        assert E.cache_key("export", dataclasses.asdict(dataclasses.replace(SMALL, **{field: value})), deps) != key
    assert E.cache_key("media", {"name": "tiny_t5"}, deps) != E.cache_key("media", {"name": "tiny_vae"}, deps)


def test_tree_digest_sees_bytes_and_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.py").write_text("x = 1\n")
    (tmp_path / "a" / "__pycache__").mkdir()
    first = E.tree_digest(tmp_path)
    (tmp_path / "a" / "__pycache__" / "x.pyc").write_bytes(b"compiled")   # caches are not inputs
    assert E.tree_digest(tmp_path) == first
    (tmp_path / "a" / "x.py").write_text("x = 2\n")
    changed = E.tree_digest(tmp_path)
    assert changed != first
    (tmp_path / "a" / "x.py").rename(tmp_path / "a" / "y.py")
    assert E.tree_digest(tmp_path) not in (first, changed)


def test_library_versions_name_the_exporters_libraries():
    versions = E.library_versions()
    assert versions["torch"] and versions["onnx"] and versions["python"]


def test_equal_requests_share_a_build_and_a_changed_input_rebuilds(tmp_path, monkeypatch):
    factory = E.ExportFactory(tmp_path / "cache")
    a = factory(SMALL)
    assert factory.builds == 1 and (a / "manifest.json").is_file() and (a / "shallow_step_1.onnx").is_file()
    # the same request, spelt by its fields: the same directory, no second build
    assert factory(**E.GOLDENS_FLOW, graphs=["shallow_step_1"]) == a and factory.builds == 1
    # another process (an xdist worker, a later session with STARFLOW_TEST_EXPORTS) finds the entry on disk
    again = E.ExportFactory(tmp_path / "cache")
    assert again(SMALL) == a and again.builds == 0
    # a changed exporter source (any file of the package) is a new key: built anew, the old entry untouched
    monkeypatch.setitem(E._DIGESTS, "package", "a-changed-source")
    changed = E.ExportFactory(tmp_path / "cache")
    b = changed(SMALL)
    assert b != a and changed.builds == 1 and (b / "manifest.json").is_file()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == sorted(
        [a.parent.name, b.parent.name])
    # nothing is left of a build but its entry (and its lock)
    assert not [p for p in (tmp_path / "cache").iterdir() if ".partial" in p.name]


def test_a_write_into_a_shared_export_is_caught(tmp_path):
    factory = E.ExportFactory(tmp_path / "cache")
    out = factory(SMALL)
    assert factory.check_untouched() == []
    (out / "manifest.json").write_text((out / "manifest.json").read_text() + " ")
    assert factory.check_untouched() == [str(out.parent)]


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="unknown media source"):
        E.ExportSpec(text_encoder="t5-xl")
    with pytest.raises(ValueError, match="goes with model='toy'"):
        E.ExportSpec(model="goldens", text_encoder="toy")
    with pytest.raises(ValueError, match="unknown test model"):
        E.ExportSpec(model="7b")
