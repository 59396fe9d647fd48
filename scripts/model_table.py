"""Print (or write into README.md between markers) the model table generated from the registry.

Built from each variant's ``ModelInfo`` only (no model is traced, so the README test stays instant as
the zoo grows); every family's tests check that ``count_params`` equals the official count.

    python scripts/model_table.py              # print
    python scripts/model_table.py --write README.md
"""
from __future__ import annotations

import argparse
import pathlib
import re

BEGIN, END = "<!-- model-table:begin -->", "<!-- model-table:end -->"


def model_table() -> str:
    import jaxformers

    rows = ["| model | family | paper | arXiv | params (M) | score (top-1 unless named) | status |",
            "|---|---|---|---|---|---|---|"]
    for name in jaxformers.list_models():
        info = jaxformers.model_info(name)
        paper = "–" if info.params_m is None else f"{info.params_m:g}"
        top1 = "–" if info.top1 is None else f"{info.top1:g}" + ("" if info.metric == "top-1" else f" {info.metric}")
        arxiv = f"[{info.arxiv}](https://arxiv.org/abs/{info.arxiv})" if info.arxiv else "–"
        rows.append(f"| `{name}` | {info.family} | {info.paper} | {arxiv} | {paper} | {top1} | {info.status} |")
    return "\n".join(rows)


def replace_table(text: str, table: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"README has no {BEGIN} ... {END} markers")
    return pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", type=pathlib.Path, help="README to update in place")
    args = ap.parse_args()
    table = model_table()
    if args.write:
        args.write.write_text(replace_table(args.write.read_text(), table))
    else:
        print(table)


if __name__ == "__main__":
    main()
