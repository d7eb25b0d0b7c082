"""Peak RSS of one variant, alone in a fresh process: load it, run the images, print the peak in MB as JSON.

Run by ``python -m benchmarks`` (one child per variant) because a process's peak RSS never goes down, so variants
sharing the timing process cannot be told apart."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.variants import VARIANTS, open_variant


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=VARIANTS)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("images", nargs="+", type=Path)
    a = ap.parse_args()
    open_variant(a.variant, a.model, a.threads).run_all(a.images)
    # VmHWM, not getrusage: Linux carries ru_maxrss across exec, so a child would report its parent's peak.
    hwm_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": hwm_kb / 1024}))


if __name__ == "__main__":
    main()
