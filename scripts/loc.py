"""Line counts of a source tree: total, blank, comment, docstring and code lines (the rest).

    python scripts/loc.py mimc            # totals
    python scripts/loc.py mimc --top 20   # and the 20 files with the most code lines

Docstrings are the first string statement of a module, class or function (as ``ast`` sees them);
comments are lines whose first non-blank character is ``#``.
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path


def count(path: Path) -> dict[str, int]:
    source = path.read_text()
    lines = source.splitlines()
    docstring = 0
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstring += first.end_lineno - first.lineno + 1
    blank = sum(1 for line in lines if not line.strip())
    comment = sum(1 for line in lines if line.strip().startswith("#"))
    return {"total": len(lines), "blank": blank, "comment": comment, "docstring": docstring,
            "code": len(lines) - blank - comment - docstring}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--top", type=int, default=0, help="also list the N files with the most code lines")
    args = parser.parse_args()
    files = {p: count(p) for p in sorted(args.root.rglob("*.py"))}
    totals = {k: sum(c[k] for c in files.values()) for k in ("total", "blank", "comment", "docstring", "code")}
    print("  ".join(f"{k} {v}" for k, v in totals.items()))
    for path, c in sorted(files.items(), key=lambda item: -item[1]["code"])[: args.top]:
        print(f"{c['total']:6d} {c['code']:6d}  {path}")


if __name__ == "__main__":
    main()
