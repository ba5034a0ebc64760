"""The cluster's /metrics: every live replica's Prometheus text, each sample labelled `replica="<id>"`, merged
per family."""

from __future__ import annotations


def merge_metrics(texts: dict[str, str]) -> str:
    """Prometheus texts of several replicas -> one text, every sample labelled `replica`, grouped by family."""
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.utils import floatToGoString

    families: dict[str, tuple[str, str, list[str]]] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            entry = families.setdefault(family.name, (family.type, family.documentation, []))
            for sample in family.samples:
                labels = {**sample.labels, "replica": replica}
                rendered = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
                entry[2].append(f"{sample.name}{{{rendered}}} {floatToGoString(sample.value)}")
    lines = []
    for name, (kind, doc, samples) in families.items():
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", *samples]
    lines.append(f"# HELP nova_ray_replicas replicas reporting to the adapter coordinator\n"
                 f"# TYPE nova_ray_replicas gauge\nnova_ray_replicas {len(texts)}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
