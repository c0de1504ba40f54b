#!/usr/bin/env python3
"""Write docs/config.md from the settings' field definitions (trioproxy._configdoc).

Run after adding or changing a setting, an upstream group key or a route key:

    python scripts/config_doc.py            # writes docs/config.md
    python scripts/config_doc.py --check    # exit 1 if docs/config.md is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trioproxy._configdoc import render_config_doc

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the page is current")
    args = parser.parse_args()
    text = render_config_doc()
    if args.check:
        current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is stale: run python scripts/config_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
