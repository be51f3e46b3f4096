#!/usr/bin/env python3
"""Keep t/cases/examples/NAME.yaml in step with examples/NAME/.

The test harness cannot read files outside a case's directory, so each case
inlines copies of its example's Lua files (under `files:`) and of its
luagate.yaml (the `check:` step). This script compares them:

    python3 examples/sync_tests.py          # rewrite stale copies in place
    python3 examples/sync_tests.py --check  # exit 1 if any copy differs

A `files:` entry preceded by a comment containing "differs from the example"
is a deliberate override (e.g. testbed addresses) and is left alone. Only the
Python standard library is needed.
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CASES = ROOT / "t" / "cases" / "examples"
OVERRIDE = "differs from the example"


def block(text, indent):
    """`text` as the body of a YAML literal block at `indent` spaces."""
    return [(" " * indent + line) if line else "" for line in text.splitlines()]


def sync(case_path):
    example = EXAMPLES / case_path.stem
    lines = case_path.read_text().splitlines()
    out, problems = [], []
    seen = set()
    i = 0
    in_files = False
    while i < len(lines):
        line = lines[i]
        if not line.startswith(" ") and line.strip():
            in_files = line.startswith("files:")
        stripped = line.strip()
        # a files: entry `  PATH: |`
        if in_files and line.startswith("  ") and not line.startswith("   ") and stripped.endswith(": |"):
            rel = stripped[: -len(": |")]
            seen.add(rel)
            j = i + 1
            while j < len(lines) and (lines[j] == "" or lines[j].startswith("    ")):
                j += 1
            # trailing blank lines belong to what follows
            while j > i + 1 and lines[j - 1] == "":
                j -= 1
            overridden = out and OVERRIDE in out[-1]
            src = example / rel
            if overridden or not src.is_file():
                out.extend(lines[i:j])
            else:
                want = block(src.read_text(), 4)
                if lines[i + 1 : j] != want:
                    problems.append(f"{case_path.name}: files: {rel} differs from {src.relative_to(ROOT)}")
                out.append(line)
                out.extend(want)
            i = j
            continue
        # the check step: `  - check: |` followed by the config at 6 spaces
        if stripped == "- check: |":
            j = i + 1
            while j < len(lines) and (lines[j] == "" or lines[j].startswith("      ")):
                j += 1
            while j > i + 1 and lines[j - 1] == "":
                j -= 1
            want = block((example / "luagate.yaml").read_text(), 6)
            if lines[i + 1 : j] != want:
                problems.append(f"{case_path.name}: check: differs from examples/{example.name}/luagate.yaml")
            out.append(line)
            out.extend(want)
            i = j
            continue
        out.append(line)
        i += 1
    for src in sorted((example / "lua").rglob("*.lua")):
        rel = str(src.relative_to(example))
        if rel not in seen:
            problems.append(f"{case_path.name}: files: {rel} is missing")
    return "\n".join(out) + "\n", problems


def main():
    check = "--check" in sys.argv[1:]
    failed = False
    for case_path in sorted(CASES.glob("*.yaml")):
        if not (EXAMPLES / case_path.stem / "luagate.yaml").is_file():
            continue
        text, problems = sync(case_path)
        for p in problems:
            print(p)
        if problems:
            failed = True
            if not check:
                case_path.write_text(text)
                print(f"{case_path.relative_to(ROOT)}: updated")
    if check and failed:
        sys.exit(1)
    if not failed:
        print("t/cases/examples: in step with examples/")


if __name__ == "__main__":
    main()
