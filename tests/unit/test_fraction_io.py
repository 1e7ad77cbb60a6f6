"""Nested data fractions and the file helpers every stage relies on."""

from __future__ import annotations

import json

import pytest

from stllava_med.data.fraction import in_fraction, select_fraction
from stllava_med.utils.io import JsonlWriter, atomic_write_json, read_jsonl, stable_hash

IDS = [f"pair-{i}" for i in range(5000)]


def test_fractions_are_nested_and_close_to_target():
    subsets = {f: set(select_fraction(IDS, f, seed=3)) for f in (0.09, 0.25, 0.5, 1.0)}
    assert subsets[0.09] <= subsets[0.25] <= subsets[0.5] <= subsets[1.0] == set(IDS)
    for f in (0.09, 0.25, 0.5):
        assert abs(len(subsets[f]) / len(IDS) - f) < 0.03


def test_fraction_is_order_independent_and_seeded():
    a = select_fraction(IDS, 0.25, seed=1)
    b = select_fraction(list(reversed(IDS)), 0.25, seed=1)
    assert set(a) == set(b)
    assert set(a) != set(select_fraction(IDS, 0.25, seed=2))


def test_fraction_bounds():
    with pytest.raises(ValueError, match="data.fraction"):
        in_fraction("x", 0.0)
    with pytest.raises(ValueError):
        in_fraction("x", 1.5)


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: malformed JSON"):
        list(read_jsonl(path))


def test_truncated_tail_tolerated_only_when_asked(tmp_path):
    path = tmp_path / "c.jsonl"
    with JsonlWriter(path) as writer:
        writer.write({"a": 1})
        writer.write({"a": 2})
    with open(path, "a") as fh:
        fh.write('{"a": 3, "b"')  # what a killed writer leaves
    assert [r["a"] for r in read_jsonl(path, allow_truncated_tail=True)] == [1, 2]
    with pytest.raises(ValueError, match=":3:"):
        list(read_jsonl(path))


def test_atomic_json_and_stable_hash(tmp_path):
    path = atomic_write_json(tmp_path / "d" / "m.json", {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"b": 1, "a": [1, 2]}
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1}) != stable_hash({"a": 1, "b": 3})


def test_atomic_writes_give_the_modes_a_plain_write_gives(tmp_path):
    """mkstemp / mkdtemp create 0600 / 0700: a run directory shared with a group must stay readable."""
    import os

    from stllava_med.utils.io import atomic_write_text, write_dir_atomically

    mask = os.umask(0o027)
    try:
        written = atomic_write_text(tmp_path / "metrics.json", "{}")
        assert written.stat().st_mode & 0o777 == 0o640

        def export(folder):
            (folder / "model.safetensors").write_bytes(b"x")
            os.chmod(folder / "model.safetensors", 0o600)  # as a library's temp file moved into place
            (folder / "config.json").write_text("{}")

        out = write_dir_atomically(tmp_path / "merged", export)
    finally:
        os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o750
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {"model.safetensors": 0o640,
                                                                           "config.json": 0o640}
