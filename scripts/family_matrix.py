"""The backbone x stage matrix: run the family suite (tests/families) and print what works per family.

    python scripts/family_matrix.py                 # run the suite, print the Markdown table
    python scripts/family_matrix.py --write-readme  # ... and put it into README.md between its markers
    python scripts/family_matrix.py --junit FILE    # tabulate an existing junit XML instead of running

Each cell is derived from the suite's results, never written by hand: ``works`` when every test of that
stage passed for the family, ``unsupported: <reason>`` for a strict xfail (the stage refuses the family
with that reason at start-up), ``FAILS`` otherwise. The fast-path columns come from the family records
(:mod:`stllava_med.families`): ``fast (= plain path)`` where the family has the fast path and its equivalence tests
passed, ``falls back`` (the plain path, logged once) where it has none.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
START, END = "<!-- family-matrix:start -->", "<!-- family-matrix:end -->"

# (test name, its other parameters) keywords -> matrix column, first match wins. A test that matches nothing
# lands in "other checks", so nothing the suite verifies is dropped from the table silently.
COLUMNS: list[tuple[str, tuple[str, ...]]] = [
    ("prompts & exact targets", ("published_template", "targets", "training_prefix", "stop_tokens")),
    ("batched = single generation", ("batched_generation",)),
    ("evaluate", ("evaluate",)),
    ("SFT LoRA", ("sft_trains_and_exports_a_model_that_reloads-lora",)),
    ("SFT full", ("sft_trains_and_exports_a_model_that_reloads-full", "full_finetune")),
    ("generate (self-questioning)", ("self_questioning",)),
    ("generate (dataset) + judge", ("then_judge",)),
    ("DPO adapter_off", ("reference_mode-adapter_off",)),
    ("DPO copy", ("reference_mode-copy",)),
    ("DPO precomputed", ("reference_mode-precomputed",)),
    ("DPO log-probs = plain forward", ("logprob_path", "gradients_through", "reference_modes_equal")),
    ("LoRA, vision LoRA, lr groups", ("lora_wraps", "projector_parameter", "lr_groups", "patterns_match")),
    ("export / reload", ("export",)),
    ("shared-prefix sampling = plain", ("shared_prefix_sampling",)),
]
OTHER = "other checks"


def column_of(test: str, params: list[str]) -> str:
    name = "-".join([test, *params]).lower()
    for column, keys in COLUMNS:
        if any(k in name for k in keys):
            return column
    return OTHER


def run_suite(junit: Path) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "tests/families", f"--junitxml={junit}"]
    print("$", " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd, cwd=REPO, env=env)


def parse(junit: Path) -> dict[str, dict[str, list[tuple[str, str, str]]]]:
    """family -> column -> [(test, outcome, message)]"""
    cells: dict[str, dict[str, list[tuple[str, str, str]]]] = defaultdict(lambda: defaultdict(list))
    for case in ET.parse(junit).getroot().iter("testcase"):
        match = re.match(r"(?P<test>[^\[]+)\[(?P<params>.+)\]$", case.get("name", ""))
        if not match:
            continue
        params = match["params"].split("-")
        family = next((p for p in params if p in _families()), None)
        if family is None:
            continue
        outcome, message = "passed", ""
        for child in case:
            if child.tag == "skipped":
                text = child.get("message", "")
                outcome = "xfail" if child.get("type") == "pytest.xfail" or "xfail" in text.lower() else "skipped"
                message = text
            elif child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message", "")
        others = [p for p in params if p != family]
        cells[family][column_of(match["test"], others)].append((match["test"], outcome, message))
    return cells


def _families() -> tuple[str, ...]:
    sys.path.insert(0, str(REPO / "tests"))
    from families.builders import FAMILIES

    return FAMILIES


def _cell(results: list[tuple[str, str, str]]) -> str:
    if not results:
        return "–"
    outcomes = {o for _, o, _ in results}
    if "failed" in outcomes:
        return "FAILS"
    if "xfail" in outcomes:
        reasons = sorted({m.removeprefix("reason: ").strip() for _, o, m in results if o == "xfail"})
        return "unsupported: " + "; ".join(r for r in reasons if r)[:120]
    if outcomes == {"skipped"}:
        return "skipped"
    return "works"


def table(cells: dict[str, dict[str, list[tuple[str, str, str]]]]) -> str:
    sys.path.insert(0, str(REPO / "src"))
    import importlib

    from stllava_med.families import family_of

    builders = importlib.import_module("families.builders")
    # the equivalence tests of the fast paths are shown in the last two columns, not on their own
    fast_columns = ("DPO log-probs = plain forward", "shared-prefix sampling = plain")
    columns = [c for c, _ in COLUMNS if c not in fast_columns and any(c in cells[f] for f in cells)]
    if any(OTHER in cells[f] for f in cells):
        columns.append(OTHER)
    header = ["family (tiny real model)", "model family", *columns, "DPO prefix sharing", "K-answer shared prefix"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in builders.FAMILIES:
        if name not in cells:
            continue
        config = _config(name)
        family = family_of(config)
        row = [name, family.name]
        row += [_cell(cells[name].get(c, [])) for c in columns]
        for column, supported in zip(fast_columns, (family.prefix_sharing, family.shared_prefix_sampling)):
            results = cells[name].get(column, [])
            verified = bool(results) and all(o == "passed" for _, o, _ in results)
            if not verified:
                row.append("FAILS" if results else "untested")
            else:
                row.append("fast (= plain path)" if supported else "falls back (plain path)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _config(family: str):
    """The family's transformers config, as its tiny builder makes it (built into a temporary dir)."""
    from transformers import AutoConfig

    from families.builders import build

    with tempfile.TemporaryDirectory() as tmp:
        return AutoConfig.from_pretrained(build(family, Path(tmp) / family))


def write_readme(markdown: str) -> None:
    text = README.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{README} has no {START} ... {END} block to replace")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{markdown}\n{END}{tail}", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--junit", type=Path, help="tabulate this junit XML instead of running the suite")
    parser.add_argument("--write-readme", action="store_true", help="replace the matrix block in README.md")
    args = parser.parse_args()
    code = 0
    junit = args.junit
    if junit is None:
        junit = Path(tempfile.mkdtemp()) / "families.xml"
        code = run_suite(junit)
    markdown = table(parse(junit))
    print(markdown)
    if args.write_readme:
        write_readme(markdown)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
