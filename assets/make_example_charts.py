"""Regenerate the playground's example images (small PNGs committed next to this script).

    python assets/make_example_charts.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

HERE = Path(__file__).resolve().parent


def revenue_chart(path: Path) -> None:
    fig = Figure(figsize=(4.0, 2.6), dpi=80, layout="constrained")
    ax = fig.add_subplot()
    quarters = ["Q1", "Q2", "Q3", "Q4"]
    ax.bar(quarters, [4.1, 4.6, 5.3, 6.2], color="#4363d8", label="2024")
    ax.plot(quarters, [3.8, 3.9, 4.2, 4.4], color="#f58231", marker="o", label="2023")
    ax.set_title("Quarterly revenue (USD millions)")
    ax.set_ylabel("revenue")
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path, format="png")


def headcount_chart(path: Path) -> None:
    fig = Figure(figsize=(4.0, 2.6), dpi=80, layout="constrained")
    ax = fig.add_subplot()
    ax.pie([45, 25, 18, 12], labels=["Engineering", "Sales", "Support", "Admin"], autopct="%d%%",
           colors=["#3cb44b", "#4363d8", "#f58231", "#911eb4"], textprops={"fontsize": 8})
    ax.set_title("Headcount by department")
    fig.savefig(path, format="png")


if __name__ == "__main__":
    revenue_chart(HERE / "chart_revenue.png")
    headcount_chart(HERE / "chart_headcount.png")
