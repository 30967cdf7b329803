"""Summarise a pytest-benchmark JSON file (``--benchmark-json``) as a Markdown table, with the
figures each benchmark records in ``extra_info`` (events/s, ratios, percentiles).

    python bench/report.py out.json
"""

import json
import sys


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    m = data["machine_info"]
    print(f"machine: {m.get('cpu', {}).get('brand_raw', m.get('processor'))}, "
          f"{m.get('cpu', {}).get('count', '?')} cores, Python {m['python_version']}")
    print()
    print("| benchmark | median | figures measured in the same run |")
    print("|---|---|---|")
    for b in data["benchmarks"]:
        med = b["stats"]["median"]
        unit = f"{med * 1e3:.1f} ms" if med < 10 else f"{med:.2f} s"
        if med < 1e-3:
            unit = f"{med * 1e6:.1f} µs"
        extra = ", ".join(f"{k} = {v:,.4g}" if isinstance(v, float) else f"{k} = {v:,}"
                          for k, v in b.get("extra_info", {}).items())
        print(f"| `{b['name']}` | {unit} | {extra} |")


if __name__ == "__main__":
    main(sys.argv[1])
