"""Pre-filled examples: one click shows what instructions do (legal, medical, code, a chart image)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets"


@dataclass(frozen=True)
class Example:
    name: str
    query: str
    candidates: list[str]
    variants: tuple[str, str, str]
    query_task: str = "retrieval.query"
    passage_task: str = "retrieval.passage"
    images: list[str] = field(default_factory=list)

    @property
    def candidates_text(self) -> str:
        return "\n---\n".join(self.candidates)

    @property
    def image_paths(self) -> list[str]:
        return [str(ASSETS / name) for name in self.images]


EXAMPLES = [
    Example(
        name="Legal",
        query="Can my landlord keep my security deposit for normal wear and tear?",
        candidates=[
            "§ 1950.5(b): A landlord may claim from the security only amounts reasonably necessary to repair "
            "damages, exclusive of ordinary wear and tear, caused by the tenant.",
            "Tenant tip: take dated photos of every room when you move in and out; it is the easiest way to "
            "get your whole deposit back.",
            "Ordinary wear and tear means deterioration from normal, intended use, such as faded paint or "
            "worn carpet in walkways.",
            "The court held that the lessor breached the covenant of quiet enjoyment by repeated entry "
            "without notice.",
            "Our apartments come with a modern kitchen, in-unit laundry and a rooftop terrace.",
        ],
        variants=(
            "Retrieve the statute or legal provision that answers the question.",
            "Retrieve practical, plain-language advice for a tenant.",
            "",
        ),
    ),
    Example(
        name="Medical",
        query="first-line treatment for type 2 diabetes",
        candidates=[
            "Metformin is recommended as the initial pharmacologic agent for type 2 diabetes in addition to "
            "lifestyle modification, unless contraindicated.",
            "Type 2 diabetes means your body does not use insulin well. Eating healthy food, moving more and "
            "taking your medicine can help you feel better.",
            "In a randomized trial (n=4,200), SGLT2 inhibitors reduced hospitalization for heart failure by "
            "31% versus placebo.",
            "Type 1 diabetes is an autoimmune disease treated with insulin from diagnosis.",
            "Hypertension guidelines recommend thiazide diuretics, ACE inhibitors or calcium channel blockers.",
        ],
        variants=(
            "Retrieve clinical practice guideline recommendations for physicians.",
            "Retrieve patient-friendly explanations in simple words.",
            "Retrieve results of randomized controlled trials.",
        ),
    ),
    Example(
        name="Code",
        query="reverse a linked list in place",
        candidates=[
            "def reverse(head):\n    prev = None\n    while head:\n        head.next, prev, head = prev, head, head.next\n    return prev",
            "function reverse(head) {\n  let prev = null;\n  while (head) { [head.next, prev, head] = [prev, head, head.next]; }\n  return prev;\n}",
            "To reverse a singly linked list, walk it once and point each node's next at the previous node.",
            "def reverse_string(s):\n    return s[::-1]",
        ],
        variants=(
            "Retrieve Python code.",
            "Retrieve JavaScript code.",
            "Retrieve an explanation in English, not code.",
        ),
        query_task="code.query",
        passage_task="code.passage",
    ),
    Example(
        name="Chart image",
        query="How did quarterly revenue grow in 2024 compared with 2023?",
        candidates=[
            "Revenue rose every quarter of 2024, from $4.1M in Q1 to $6.2M in Q4, well ahead of 2023.",
            "The company employs 240 people, most of them in engineering.",
        ],
        variants=(
            "Retrieve charts and figures that show the answer.",
            "Retrieve written financial reports.",
            "",
        ),
        images=["chart_revenue.png", "chart_headcount.png"],
    ),
]
